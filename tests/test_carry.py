"""Gradients and optimizer state through growth: the dual of the growth map, and ``rewrite.carry``.

The staged-training test generalised to every width and depth pass with every exact policy: after a few AdamW
steps on the original, the grown model's gradients on a batch equal the original's pushed through the map's
dual on every entry growth did not add, and ``carry_optimizer(policy="mapped")`` gives moments equal to the
mapped originals.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_state

import passes
import rewrite
from rewrite.app import zoo

PLANS = {
    "widen_mlp": lambda init, ratio: [passes.widen_mlp(factor=2, init=init)],
    "add_heads": lambda init, ratio: [passes.add_heads((4 if init == "clone" else 2) * ratio, init=init)],
    "widen_heads(v)": lambda init, ratio: [passes.widen_heads(v=16 if init == "clone" else 12, init=init)],
    "widen_hidden": lambda init, ratio: [passes.widen_hidden(factor=2, init=init)],
}
DEPTH = {
    "add_layers(zero)": [passes.add_layers(1, at=0)],
    "add_layers(copy)": [passes.add_layers(1, init="copy")],
    "upcycle_moe": [passes.upcycle_moe(2, top_k=1)],
}
MODELS = {"gpt": 1, "llama": 2, "hf-llama": 2, "hf-gpt2": 1}  # name -> query heads per key-value head
REFUSED = {("gpt", "widen_hidden", "zero"), ("hf-gpt2", "widen_hidden", "zero"), ("gpt", "widen_hidden", "net2net"),
           ("hf-gpt2", "widen_hidden", "net2net"), ("llama", "widen_hidden", "net2net"),
           ("hf-llama", "widen_hidden", "net2net")}  # LayerNorm + zero padding; non-uniform replication under norms


def logits_of(out):
    return out.logits if hasattr(out, "logits") else out


def trained(name: str, steps: int = 3):
    """A zoo model after a few AdamW steps on a fixed batch, its optimizer and its loss function."""
    built = zoo.build(name)
    model = built.model.eval()
    vocab = logits_of(model(*built.args)).shape[-1]
    target = torch.randint(0, vocab, logits_of(model(*built.args)).shape[:-1])

    def loss(m):
        return F.cross_entropy(logits_of(m(*built.args)).reshape(-1, vocab), target.reshape(-1))

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        loss(model).backward()
        optimizer.step()
    return built, model, optimizer, loss


def gradients(module, loss) -> dict:
    module.zero_grad()
    loss(module).backward()
    return {n: p.grad.detach().clone() for n, p in module.named_parameters()}


def assert_mapped(grown, mapped: dict, actual: dict, scale: float, rtol: float = 1e-5) -> None:
    """Every entry growth did not add agrees, relative to the scale of the original's values."""
    checked = 0
    for name, value in mapped.items():
        old = ~grown.map.new_entries(name)
        error = float((actual[name][old] - value[old]).abs().max()) if old.any() else 0.0
        assert error <= rtol * scale, f"{name}: {error:.3g} > {rtol} x {scale:.3g}"
        checked += int(old.sum())
    assert checked > 0


CASES = [(name, label, init) for name in MODELS for label in PLANS for init in ("zero", "clone", "net2net")
         if (name, label, init) not in REFUSED] + [(name, label, None) for name in MODELS for label in DEPTH]


@pytest.mark.parametrize("name, label, init", CASES)
def test_gradients_and_adam_moments_follow_the_dual_of_the_map(name, label, init):
    built, model, optimizer, loss = trained(name)
    plan = DEPTH[label] if init is None else PLANS[label](init, MODELS[name])
    grown = rewrite.apply(model, plan, built.args, built.kwargs)  # verified exact
    original = gradients(model, loss)
    scale = max(float(g.abs().max()) for g in original.values())
    assert_mapped(grown, grown.map.apply(original, kind="gradient"), gradients(grown.module, loss), scale)

    carried = rewrite.carry(optimizer, grown, grown.module, policy="mapped")
    state = {n: optimizer.state[p] for n, p in model.named_parameters()}
    new_state = {n: carried.optimizer.state.get(p, {}) for n, p in grown.module.named_parameters()}
    for field, kind in (("exp_avg", "gradient"), ("exp_avg_sq", "second_moment")):
        mapped = grown.map.apply({n: s[field] for n, s in state.items()}, kind=kind)
        for param, value in mapped.items():
            if grown.map.recipes[grown.map.canonical(param)].role == "kept":
                assert_same_state({param: new_state[param][field]}, {param: value})
            else:  # a copy into a new role, or new: its own fresh state
                assert param in carried.fresh and not new_state[param]
    for param, s in new_state.items():
        if s:
            assert float(s["step"]) == 3.0


def test_mapped_moments_of_a_split_unit_are_shared_and_its_consumer_keeps_them():
    """Uniform cloning x2 of the MLP: each copied producer row has exp_avg/2 and exp_avg_sq/4, each divided
    consumer column the full values (the ratios the staged-training paper measures: 0.5 and 1.0)."""
    built, model, optimizer, loss = trained("llama")
    grown = rewrite.apply(model, [passes.widen_mlp(factor=2, init="clone")], built.args)
    new = rewrite.carry_optimizer(optimizer, grown, grown.module)
    params = dict(grown.module.named_parameters())
    old_state = {n: optimizer.state[p] for n, p in model.named_parameters()}
    up, down = "blocks.0.mlp.up.weight", "blocks.0.mlp.down.weight"
    m_up, v_up = new.state[params[up]]["exp_avg"], new.state[params[up]]["exp_avg_sq"]
    hidden = old_state[up]["exp_avg"].shape[0]
    for half in (slice(0, hidden), slice(hidden, 2 * hidden)):
        assert torch.allclose(m_up[half], old_state[up]["exp_avg"] / 2)
        assert torch.allclose(v_up[half], old_state[up]["exp_avg_sq"] / 4)
        assert torch.equal(new.state[params[down]]["exp_avg"][:, half], old_state[down]["exp_avg"])


def test_groups_follow_sources_and_every_parameter_is_trained_once():
    built, model, _, loss = trained("gpt")
    blocks = [p for n, p in model.named_parameters() if n.startswith("blocks.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("blocks.")]
    optimizer = torch.optim.AdamW([{"params": blocks, "lr": 1e-3}, {"params": rest, "lr": 5e-4, "weight_decay": 0.0}])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    for _ in range(2):
        optimizer.zero_grad()
        loss(model).backward()
        optimizer.step()
        scheduler.step()
    grown = rewrite.apply(model, [passes.add_layers(1, at=0), passes.upcycle_moe(2, top_k=1, layers=[0])], built.args)
    carried = rewrite.carry(optimizer, grown, grown.module, scheduler)
    groups = carried.optimizer.param_groups
    assert [g["lr"] for g in groups] == [g["lr"] for g in optimizer.param_groups]
    assert groups[1]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == 0.01
    in_group = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
    params = dict(grown.module.named_parameters())
    assert in_group[id(params["blocks.1.attn.q.weight"])] == 0  # a copied block joins its source's group
    assert in_group[id(params["blocks.0.router.weight"])] == 0  # a router joins its module's others
    assert len(in_group) == len(params)  # every parameter, once (check_groups ran inside carry)
    carried.optimizer.zero_grad()
    loss(grown.module).backward()
    carried.optimizer.step()
    carried.scheduler.step()  # the schedule continues where it was: step 3 of lambda 1/(1+step)
    assert groups[0]["lr"] == pytest.approx(1e-3 / 4) and groups[1]["lr"] == pytest.approx(5e-4 / 4)
    assert "blocks.1.attn.q.weight" in carried.fresh  # a copied block starts fresh by default ...
    sourced = rewrite.carry(optimizer, grown, grown.module, copies="source").optimizer  # ... or takes its source's
    source = optimizer.state[dict(model.named_parameters())["blocks.0.ln1.weight"]]
    assert torch.equal(sourced.state[params["blocks.1.ln1.weight"]]["exp_avg"], source["exp_avg"])
    assert not sourced.state[params["blocks.1.attn.q.weight"]]["exp_avg"].any()  # redrawn by init="zero": no identity


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
])
def test_sgd_momentum_and_amsgrad_are_carried_by_kind(make):
    built = zoo.build("llama")
    model = built.model.eval()
    optimizer = make(model.parameters())
    for _ in range(2):
        optimizer.zero_grad()
        model(*built.args).square().mean().backward()
        optimizer.step()
    grown = rewrite.apply(model, [passes.widen_mlp(factor=2, init="net2net")], built.args)
    new = rewrite.carry_optimizer(optimizer, grown, grown.module)
    name = "blocks.1.mlp.gate.weight"
    old, param = dict(model.named_parameters())[name], dict(grown.module.named_parameters())[name]
    for field, kind in (("momentum_buffer", "gradient"), ("exp_avg", "gradient"), ("max_exp_avg_sq", "second_moment")):
        if field in optimizer.state[old]:
            expected = grown.map.make(name, {name: optimizer.state[old][field]}, kind)
            assert torch.equal(new.state[param][field], expected)


def test_adafactor_factored_rows_are_carried_where_derivable_and_reset_with_the_reason_elsewhere():
    built = zoo.build("llama")
    model = built.model.eval()
    optimizer = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    optimizer.zero_grad()
    model(*built.args).square().mean().backward()
    optimizer.step()
    grown = rewrite.apply(model, [passes.widen_mlp(factor=2)], built.args)
    carried = rewrite.carry(optimizer, grown, grown.module)
    params, old = dict(grown.module.named_parameters()), dict(model.named_parameters())
    up = "blocks.0.mlp.up.weight"  # rows grew: row_var follows the rows, col_var averages over them: reset
    assert ("blocks.0.mlp.up.weight", "col_var", "it averages over an axis that growth changed: not derivable") in \
        carried.reset and up in carried.fresh
    norm = "blocks.0.norm1.weight"  # untouched 1-d: variance kept as it was
    assert torch.equal(carried.optimizer.state[params[norm]]["variance"], optimizer.state[old[norm]]["variance"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rewrite.carry_optimizer(optimizer, grown, grown.module)
    assert "carry_optimizer reset col_var of blocks.0.mlp.up.weight: it averages over an axis that growth " \
           "changed: not derivable" in [str(w.message) for w in caught]
    carried.optimizer.zero_grad()
    grown.module(*built.args).square().mean().backward()
    carried.optimizer.step()  # the carried state is one Adafactor accepts


def test_an_unknown_optimizer_is_refused_by_name():
    built = zoo.build("mlp")
    optimizer = torch.optim.RMSprop(built.model.parameters())
    grown = rewrite.apply(built.model, [passes.widen("layers.0", factor=2)], built.args)
    with pytest.raises(rewrite.GrowthError, match="carry_optimizer does not know the state of RMSprop"):
        rewrite.carry_optimizer(optimizer, grown, grown.module)


def test_sparkling_keeps_old_state_and_new_entries_take_fresh_adam_steps():
    """The asymmetric reset: old entries keep their moments as they were, new entries start from zero. Without
    protection a new entry's first update in a long run is about (1-beta1)/sqrt(1-beta2) = 3.2 learning rates
    (it inherits the tensor's step count); with it every one of the first ten updates stays within the learning
    rate."""
    lr = 1e-3
    sizes = {}
    for protect in (False, True):
        built, model, _, loss = trained("llama", steps=0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        for _ in range(50):
            optimizer.zero_grad()
            loss(model).backward()
            optimizer.step()
        for state in optimizer.state.values():  # as if the run were 5000 steps old: bias corrections ~1
            state["step"].fill_(5000)
        grown = rewrite.apply(model, [passes.widen_mlp(factor=2, init="zero")], built.args)
        new = rewrite.carry_optimizer(optimizer, grown, grown.module, policy="sparkling", protect=protect)
        name = "blocks.0.mlp.down.weight"  # its new columns read the new units: they get gradients at once
        param, old = dict(grown.module.named_parameters())[name], dict(model.named_parameters())[name]
        hidden = optimizer.state[old]["exp_avg"].shape[1]
        assert torch.equal(new.state[param]["exp_avg"][:, :hidden], optimizer.state[old]["exp_avg"])
        assert not new.state[param]["exp_avg"][:, hidden:].any()
        updates, m, v = [], torch.zeros(()), torch.zeros(())
        for age in range(1, 11):
            before = param.detach().clone()
            new.zero_grad()
            loss(grown.module).backward()
            gradient = param.grad[:, hidden:].detach()
            new.step()
            update = (param.detach() - before)[:, hidden:]
            updates.append(float(update.abs().max()) / lr)
            m, v = 0.9 * m + 0.1 * gradient, 0.999 * v + 0.001 * gradient.square()  # a fresh Adam, age by age
            fresh = (lr / (1 - 0.9**age)) * m / (v.sqrt() / (1 - 0.999**age) ** 0.5 + 1e-8)
            if protect:
                assert torch.allclose(update, -fresh, rtol=1e-4, atol=1e-9)
        sizes[protect] = updates
    assert sizes[False][0] > 3.0  # the skipped bias correction: (1 - 0.9) / sqrt(1 - 0.999) = 3.16
    assert sizes[True][0] == pytest.approx(1.0, abs=1e-3)  # a fresh Adam's first step: exactly lr
    assert max(sizes[True]) < 1.1  # after it, what a fresh Adam does (|m^|/sqrt(v^) ~ 1 on these gradients)


def test_rewarm_scales_the_updates_of_what_growth_added_and_nothing_else():
    """Plain SGD (an update is exactly -lr * g): new entries move by (1 + 0.3 a / 4) lr g for a = 1..4, then back
    down to 1 by a = 8; old entries by exactly lr g throughout."""
    built = zoo.build("llama")
    model = built.model.eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    grown = rewrite.apply(model, [passes.widen_mlp(factor=2), passes.add_layers(1, init="copy")], built.args)
    new = rewrite.carry_optimizer(optimizer, grown, grown.module, rewarm=(1.3, 4))
    params = dict(grown.module.named_parameters())
    widened, copied = params["blocks.0.mlp.down.weight"], params["blocks.2.attn.q.weight"]
    mask = grown.map.new_entries("blocks.0.mlp.down.weight")
    expected = [1.075, 1.15, 1.225, 1.3, 1.225, 1.15, 1.075, 1.0, 1.0]
    for scale in expected:
        before = {p: p.detach().clone() for p in (widened, copied)}
        new.zero_grad()
        grown.module(*built.args).square().mean().backward()
        gradients = {p: p.grad.detach().clone() for p in (widened, copied)}
        new.step()
        step = {p: p.detach() - before[p] for p in (widened, copied)}
        close = dict(rtol=1e-4, atol=1e-7)  # atol: the float rounding of w + step, w ~ 0.1
        assert torch.allclose(step[widened][mask], -0.1 * scale * gradients[widened][mask], **close)
        assert torch.allclose(step[widened][~mask], -0.1 * gradients[widened][~mask], **close)
        assert torch.allclose(step[copied], -0.1 * scale * gradients[copied], **close)


def test_release_frees_the_old_state_as_it_is_carried_and_carries_the_same_state():
    """``release=True``: the old optimizer's gradients and state are gone afterwards, and the carried state is
    what carrying without it gives, bit for bit."""
    built, model, optimizer, loss = trained("llama")
    loss(model).backward()  # gradients held, as mid-training
    grown = rewrite.apply(model, [passes.widen_mlp(factor=2, init="clone"), passes.add_layers(1, init="copy")],
                          built.args)
    kept = rewrite.carry(optimizer, grown, grown.module, copies="source").optimizer
    freed = rewrite.carry(optimizer, grown, grown.module, copies="source", release=True).optimizer
    assert not optimizer.state and all(p.grad is None for p in model.parameters())
    for p in grown.module.parameters():
        assert kept.state[p].keys() == freed.state[p].keys()
        for field, value in kept.state[p].items():
            assert torch.equal(value, freed.state[p][field]), field
