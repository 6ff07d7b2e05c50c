"""Growth where users train: on a device that is not the CPU (``pretend_device``: it raises where CUDA raises),
in every dtype, with every optimizer implementation.

The matrix: every pass x init policy x carry policy x map kind, on a hand-written GPT and Llama and a Hugging
Face Llama (traced on the CPU, then moved: ``torch.export`` cannot trace a pretend tensor). Each case grows
the model on the device and on the CPU and checks that every tensor the growth makes lives on the device and
has the CPU's bits (seeded draws included), that the map's duals do the same, that the optimizer state carried
under each policy lives there with the CPU's bits, and that a training step of the grown model runs on the
device and keeps every parameter and state there. (The step itself is not compared with the CPU's: autograd
decomposes some composite ops otherwise for a device tensor, and Adam turns gradients that are zero up to
rounding, a key bias's or a top-1 router's, into full steps in the direction of their rounding.)
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

import passes
import rewrite
from pretend_device import DeviceMismatch, Pretend, device, to_cpu, to_pretend
from rewrite.app import zoo

WIDTH = {  # approximate inits (sparkling, net2net under norms) allowed: their draws are what is tested
    "widen_mlp": lambda init: [passes.widen_mlp(factor=2, init=init, exact=False)],
    "add_heads": lambda init: [passes.add_heads(4 if init == "clone" else 2, init=init, exact=False)],
    "widen_heads(v)": lambda init: [passes.widen_heads(v=16 if init == "clone" else 12, init=init, exact=False)],
    "widen_heads(qk)": lambda init: [passes.widen_heads(qk=16 if init == "clone" else 12, init=init, exact=False)],
    "widen_hidden": lambda init: [passes.widen_hidden(factor=2, init=init, exact=False)],
}
INITS = ("zero", "clone", "net2net", "sparkling")
DEPTH = {
    "add_layers(zero)": lambda: [passes.add_layers(1, at=0)],  # its new blocks' matrices redrawn (seeded)
    "add_layers(copy)": lambda: [passes.add_layers(1, init="copy")],
    "split_layers": lambda: [passes.split_layers(2, layers=[0])],
    "upcycle_moe": lambda: [passes.upcycle_moe(2, top_k=1)],
    "three passes": lambda: [passes.widen_mlp(factor=2), passes.add_layers(1, init="copy"),
                             passes.widen_hidden(factor=2, init="clone")],
}
MODELS = ("gpt", "llama", "hf-llama")
POLICIES = ("mapped", "sparkling", "reset")
KINDS = ("gradient", "second_moment", "preserve")
CASES = ([(model, plan, init) for model in MODELS for plan in WIDTH for init in INITS]
         + [(model, plan, None) for model in MODELS for plan in DEPTH])


def logits_of(out):
    return out.logits if hasattr(out, "logits") else out


def _loss(module, args, kwargs, target):
    logits = logits_of(module(*args, **kwargs))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


@functools.lru_cache(maxsize=None)
def _trained(name: str):
    """(graph, (args, kwargs), target, optimizer) on the CPU, after one AdamW step, so the optimizer has state
    (made once per model: growth and carry read them and never write them)."""
    built = zoo.build(name)
    graph = rewrite.trace(built.model.eval(), built.args, built.kwargs)
    batch = (built.args, {**graph.fixed_kwargs, **built.kwargs})  # what the traced graph takes (use_cache=False)
    target = torch.randint(0, logits_of(graph.module(*batch[0], **batch[1])).shape[-1], built.args[0].shape)
    optimizer = torch.optim.AdamW(graph.module.parameters(), lr=1e-2, weight_decay=0.1)
    _loss(graph.module, *batch, target).backward()
    optimizer.step()
    optimizer.zero_grad()
    return graph, batch, target, optimizer


def _on_device(graph, batch, target, optimizer):
    """The same graph, inputs and optimizer on the pretend device."""
    module = to_pretend(copy.deepcopy(graph.module))
    on_cpu = torch.device("cpu")
    for node in module.graph.nodes:  # torch.export writes the tracing device into the graph: as if traced there
        node.args = tuple(device() if a == on_cpu else a for a in node.args)
        node.kwargs = {k: device() if v == on_cpu else v for k, v in node.kwargs.items()}
    module.recompile()
    moved = graph.with_module(module, graph.lineage)
    moved.example_args = tuple(to_pretend(a) for a in graph.example_args)
    moved.example_kwargs = to_pretend(dict(graph.example_kwargs))
    moved_optimizer = torch.optim.AdamW(moved.module.parameters(), lr=1e-2, weight_decay=0.1)
    moved_optimizer.load_state_dict(optimizer.state_dict())  # state moves to the parameters' device
    args, kwargs = batch
    return moved, (tuple(to_pretend(a) for a in args), to_pretend(dict(kwargs))), to_pretend(target), moved_optimizer


def _assert_same(on_device: dict, on_cpu: dict, what: str):
    assert list(on_device) == list(on_cpu), what
    for name, value in on_device.items():
        if torch.is_tensor(value) and value.dim() > 0:
            assert isinstance(value, Pretend), f"{what}: {name} is on {value.device}, not the device"
            assert torch.equal(value.inner, on_cpu[name]), f"{what}: {name} differs from the CPU's"


def _grow(graph, plan, batch):
    try:
        return rewrite.apply(graph, plan, *batch)
    except rewrite.GrowthError as error:
        return error


@pytest.mark.parametrize("name, plan, init", CASES)
def test_growth_carry_and_a_step_on_a_device_give_the_cpu_s_bits(name, plan, init):
    graph, batch, target, optimizer = _trained(name)
    make = (lambda: WIDTH[plan](init)) if init else DEPTH[plan]
    on_cpu = _grow(graph, make(), batch)
    if isinstance(on_cpu, rewrite.GrowthError):
        pytest.skip(f"refused on the CPU too: {on_cpu}")  # LayerNorm under zero padding and the like
    d_graph, d_batch, d_target, d_optimizer = _on_device(graph, batch, target, optimizer)
    grown = rewrite.apply(d_graph, make(), *d_batch)
    _assert_same(grown.module.state_dict(), on_cpu.module.state_dict(), "grown weights")

    state = dict(graph.module.named_parameters())
    for kind in KINDS:
        mapped = grown.map.apply(to_pretend({n: t.detach() for n, t in state.items()}), kind=kind)
        _assert_same(mapped, on_cpu.map.apply({n: t.detach() for n, t in state.items()}, kind=kind), kind)

    for policy in POLICIES:
        modules = {"cpu": copy.deepcopy(on_cpu.module), "device": copy.deepcopy(grown.module)}
        carried = {"cpu": rewrite.carry(optimizer, _with_module(on_cpu, modules["cpu"]), modules["cpu"],
                                        policy=policy).optimizer,
                   "device": rewrite.carry(d_optimizer, _with_module(grown, modules["device"]), modules["device"],
                                           policy=policy).optimizer}
        for p_device, p_cpu in zip(modules["device"].parameters(), modules["cpu"].parameters()):
            _assert_same(carried["device"].state[p_device], carried["cpu"].state[p_cpu], f"{policy} state")
        _loss(modules["cpu"], *batch, target).backward()
        _loss(modules["device"], *d_batch, d_target).backward()
        carried["cpu"].step()
        carried["device"].step()
        for name, p in modules["device"].named_parameters():
            state = carried["device"].state.get(p, {})
            assert isinstance(p, Pretend) and all(isinstance(v, Pretend) for k, v in state.items() if k != "step"), name
        assert torch.isfinite(_loss(modules["device"], *d_batch, d_target)).item()


def _with_module(grown, module):
    """``grown`` whose module is ``module`` (a copy of it, for one carry policy each)."""
    out = copy.copy(grown)
    out.module = module
    return out


def test_the_pretend_device_raises_where_cuda_does():
    """The checks the matrix stands on: a CPU operand, a CPU generator and CPU indices are refused."""
    x = to_pretend(torch.ones(3, 4))
    with pytest.raises(DeviceMismatch, match="CPU tensor of shape"):
        x.add_(torch.ones(3, 4))
    with pytest.raises(DeviceMismatch, match="CPU generator"):
        torch.randn(3, device=device(), generator=torch.Generator().manual_seed(0))
    with pytest.raises(DeviceMismatch, match="CPU tensor"):
        x.index_select(0, torch.tensor([0, 1]))
    assert torch.equal(to_cpu(x * torch.tensor(2.0)), torch.full((3, 4), 2.0))  # a 0-d CPU tensor is a scalar
    assert torch.zeros(2, device=x.device).device == x.device  # factories asked for the device make it there
    assert torch.equal(to_cpu(x[torch.tensor([0, 2])]), torch.ones(2, 4))  # CPU indices in x[...]: as CUDA


def test_a_seeded_draw_gives_the_same_bits_on_the_device_and_with_one_or_two_threads():
    from rewrite.transform import draws

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = draws.normal(300_001, 5)
        torch.set_num_threads(2)
        two = draws.normal(300_001, 5)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    target = torch.empty(300_001, device=device())
    draws.fill_(target, 5)
    assert isinstance(target, Pretend) and torch.equal(target.inner, one)
    fill = rewrite.Fill("normal", (7, 3), torch.bfloat16, seed=5, std=0.5)
    assert torch.equal(fill.make(device()).inner, fill.make())


@pytest.mark.parametrize("plan", ["widen_mlp", "add_heads"])
@pytest.mark.parametrize("options", [dict(policy="sparkling", rewarm=(1.3, 4)), dict(train="added")])
def test_step_hooks_run_on_the_device_without_waiting_for_it(plan, options):
    """Protection, re-warmup and train="added" on the device: every step reads and writes slices or device
    indices made once per growth; a step with the hooks waits for the device no more often than one without,
    and train="added" leaves every original entry as it was."""
    from pretend_device import counting_syncs

    graph, batch, target, optimizer = _trained("llama")
    d_graph, d_batch, d_target, d_optimizer = _on_device(graph, batch, target, optimizer)
    grown = rewrite.apply(d_graph, WIDTH[plan]("zero"), *d_batch)
    syncs, before = {}, {n: to_cpu(p.detach()) for n, p in grown.module.named_parameters()}
    for label, options_ in (("plain", dict(policy="mapped", protect=False)), ("hooked", options)):
        module = copy.deepcopy(grown.module)
        carried = rewrite.carry(d_optimizer, _with_module(grown, module), module, **options_)
        assert bool(carried.hooks._handles) == (label == "hooked")
        counted = [0, 0]
        for _ in range(3):
            carried.optimizer.zero_grad()
            _loss(module, *d_batch, d_target).backward()
            with counting_syncs() as in_step:
                carried.optimizer.step()
            counted = [counted[0] + in_step.count, counted[1] + in_step.masked]
        syncs[label] = counted
    assert syncs["hooked"][0] <= syncs["plain"][0] and syncs["hooked"][1] == 0, syncs
    if options.get("train") == "added":
        for name, p in module.named_parameters():
            old = ~grown.map.new_entries(name)
            assert torch.equal(to_cpu(p.detach())[old], before[name][old]), name


OPTIMIZERS = {  # eps 1e-4: float16 holds no 1e-8 (a zero gradient's update would be 0/0)
    "foreach": lambda params: torch.optim.AdamW(params, lr=1e-2, eps=1e-4, foreach=True),
    "fused": lambda params: torch.optim.AdamW(params, lr=1e-2, eps=1e-4, fused=True),
    "amsgrad": lambda params: torch.optim.Adam(params, lr=1e-2, eps=1e-4, amsgrad=True),
    "tensor lr": lambda params: torch.optim.AdamW(params, lr=torch.tensor(1e-2), eps=1e-4),
    "sgd momentum": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
    "capturable": pytest.param(lambda params: torch.optim.AdamW(params, lr=1e-2, capturable=True),
                               marks=pytest.mark.skip(reason="capturable=True runs on CUDA only")),
}
DTYPES = {"float64": (torch.float64, None), "bfloat16": (torch.bfloat16, None), "float16": (torch.float16, None),
          "autocast bfloat16": (torch.float32, torch.bfloat16)}


@pytest.mark.parametrize("make", list(OPTIMIZERS.values()), ids=list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_every_optimizer_implementation_and_dtype_carries_and_steps(make, dtype):
    """An exact growth of a Llama in each dtype (and under CPU autocast) verifies, its map remakes it bit for
    bit, and each optimizer implementation carries its options and state (in the parameters' dtype) and
    steps."""
    weights, autocast = DTYPES[dtype]
    built = zoo.build("llama")
    model = built.model.to(weights)
    optimizer = make(model.parameters())
    target = torch.randint(0, 64, built.args[0].shape)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        _loss(model, built.args, {}, target).float().backward()
    optimizer.step()
    grown = rewrite.apply(model, [passes.widen_mlp(factor=2, init="clone"), passes.add_heads(2)], built.args)
    assert grown.report.exact and all(r.verification is None or r.verification.ok for r in grown.report.passes)
    made = grown.map.apply({n: t.detach() for n, t in model.state_dict().items()})
    for name, value in grown.module.state_dict().items():
        assert value.dtype == weights and torch.equal(made[name], value), name
    carried = rewrite.carry(optimizer, grown, grown.module).optimizer
    assert {k: v for k, v in carried.defaults.items() if k != "lr"} == {
        k: v for k, v in optimizer.defaults.items() if k != "lr"}
    for p in grown.module.parameters():
        for field, value in carried.state.get(p, {}).items():
            if field != "step":
                assert value.dtype == p.dtype and value.shape == p.shape, field
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        _loss(grown.module, built.args, {}, target).float().backward()
    carried.step()
    assert all(torch.isfinite(p).all() for p in grown.module.parameters())


def test_a_seeded_growth_gives_the_same_bits_with_one_and_two_threads(monkeypatch):
    """Noise, redrawn copies and a drawn router, big enough to span several chunks and draw threads."""
    from rewrite.transform import draws

    monkeypatch.setattr(draws, "CHUNK", 256)  # many chunks on a small model
    built = zoo.build("llama")
    plan = [passes.widen_mlp(factor=2, init="sparkling", exact=False), passes.add_layers(1),
            passes.upcycle_moe(2, top_k=1)]
    threads, grown = torch.get_num_threads(), {}
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            grown[count] = rewrite.apply(built.model, plan, built.args).module.state_dict()
    finally:
        torch.set_num_threads(threads)
    assert grown[1].keys() == grown[2].keys()
    for name, value in grown[1].items():
        assert torch.equal(value, grown[2][name]), name
