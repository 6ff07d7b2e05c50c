"""Growth of an FSDP2 run's distributed checkpoint, resumed on other world sizes (gloo, spawned processes).

A tiny Llama trains 3 steps under FSDP2 on 2 processes and saves DCP (model and AdamW state from
``get_state_dict``). ``grow_distributed_checkpoint`` grows it offline, weights and optimizer state. The grown
checkpoint resumes (``rewrite.training.fsdp.resume``) on 3 processes and on 1. The reference is the same
growth done in memory on one process: the original loaded from the same checkpoint, ``rewrite.apply``,
``to_native`` and ``carry``. The loss right after resume equals the reference's, the optimizer state equals
what ``carry`` gives (fresh parameters: zero moments, step 0, which is Adam's state before its first step),
and three more steps agree across world sizes and with the reference. ``grow_online`` grows the running job
without a checkpoint, to the same result.
"""

import os
import socket

import pytest
import torch

import passes
import rewrite
from rewrite.errors import GrowfxError

transformers = pytest.importorskip("transformers")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import torch.distributed.checkpoint as dcp  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

from rewrite.io.dcp_files import DistributedCheckpoint, SafeLoadPlanner, SafeReader  # noqa: E402
from rewrite.training.fsdp import resume, shard_layers  # noqa: E402
from rewrite.training.grow_dcp import grow_distributed_checkpoint  # noqa: E402
from rewrite.training.grow_fsdp import grow_online  # noqa: E402

IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
STEPS = 3


def config(tied: bool):
    return transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                                    architectures=["LlamaForCausalLM"])


def adamw(parameters):
    return torch.optim.AdamW(parameters, lr=1e-2, weight_decay=0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _leave() -> None:
    """Wait for every process before leaving the group: a process that destroys it while another's last
    collective is in flight aborts ("terminate called without an active exception"; 3 runs in 10 with tied
    embeddings without the barrier)."""
    dist.barrier()
    dist.destroy_process_group()


def _train(world: int, tied: bool, folder: str):
    """STEPS of FSDP2 training, saved to ``folder``; the sharded model and optimizer."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config(tied))
    model.config.architectures = None  # as a model built in code has it: grow_online must not need it
    shard_layers(model, init_device_mesh("cpu", (world,)))
    optimizer = adamw(model.parameters())
    for _ in range(STEPS):
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder)
    return model, optimizer


def _train_and_save(rank: int, world: int, port: int, tied: bool, folder: str) -> None:
    _join(rank, world, port)
    _train(world, tied, folder)
    _leave()


def _state_and_steps(model, optimizer):
    """The optimizer state now (whole tensors, by parameter and field), and the loss of this and STEPS more
    steps."""
    state = {f"{name}.{field}": (value.full_tensor() if hasattr(value, "full_tensor") else value).clone()
             for name, parameter in model.named_parameters()
             for field, value in optimizer.state.get(parameter, {}).items()}
    losses = []
    for _ in range(STEPS + 1):
        loss = model(input_ids=IDS, labels=IDS).loss
        losses.append(loss.detach())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return state, torch.stack(losses)


def _continue(model, optimizer, out: str) -> None:
    """``_state_and_steps`` under FSDP2, saved by the first process."""
    state, losses = _state_and_steps(model, optimizer)
    if dist.get_rank() == 0:
        torch.save({"losses": losses, "state": state}, out)


def _train_and_grow_online(rank: int, world: int, port: int, tied: bool, plan: str, policy: str, folder: str,
                           out: str) -> None:
    _join(rank, world, port)
    model, optimizer = _train(world, tied, folder)
    grown, grown_optimizer, _ = grow_online(model, optimizer, PLANS[plan](), policy=policy)
    _continue(grown, grown_optimizer, out)
    _leave()


def _resume_and_train(rank: int, world: int, port: int, folder: str, out: str) -> None:
    _join(rank, world, port)
    model, optimizer = resume(folder, adamw)
    _continue(model, optimizer, out)
    _leave()


def _grow(rank: int, world: int, port: int, source: str, destination: str) -> None:
    _join(rank, world, port)
    grow_distributed_checkpoint(source, config(False), [passes.widen_mlp(factor=2), passes.add_layers(1)],
                                destination, max_chunk_bytes=2048)
    _leave()


def _spawn(function, world: int, *args) -> None:
    mp.spawn(function, args=(world, _free_port(), *args), nprocs=world)


def _reference(folder, tied: bool, plan, policy: str):
    """The growth in memory on one process: the original loaded from the checkpoint, grown, carried."""
    model = transformers.LlamaForCausalLM(config(tied))
    optimizer = adamw(model.parameters())
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.load({"model": model_state, "optim": optim_state}, storage_reader=SafeReader(folder),
             planner=SafeLoadPlanner(), no_dist=True)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    grown = rewrite.apply(model, plan, (), {"input_ids": IDS})
    native = rewrite.to_native(grown, model).train()
    carried = rewrite.carry(optimizer, grown, native, policy=policy, protect=False).optimizer
    state, losses = _state_and_steps(native, carried)
    return losses, state, native


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The DCP checkpoint of 3 FSDP2 steps on 2 processes, tied or untied embeddings, made once."""
    made = {}

    def checkpoint(tied: bool) -> str:
        if tied not in made:
            made[tied] = str(tmp_path_factory.mktemp("fsdp") / ("tied" if tied else "untied"))
            _spawn(_train_and_save, 2, tied, made[tied])
        return made[tied]

    return checkpoint


PLANS = {
    "mlp-depth": lambda: [passes.widen_mlp(factor=2), passes.add_layers(1)],
    "hidden-copy": lambda: [passes.widen_hidden(factor=2, init="clone"), passes.add_layers(1, at=0, init="copy")],
}


def _assert_resumed_like_the_reference(result: dict, losses, state: dict, label: str) -> None:
    # the loss right after growth: the grown single-process model's (exact plans)
    assert result["losses"][0].item() == pytest.approx(losses[0].item(), abs=1e-6), label
    # the optimizer state: what carry gives; fresh parameters at Adam's start (zero moments, step 0)
    for key, value in result["state"].items():
        expected = state.get(key, torch.zeros_like(value))
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=f"{key} ({label})")
    # more steps agree with the reference
    torch.testing.assert_close(result["losses"], losses, rtol=0, atol=2e-5)


@pytest.mark.parametrize("tied, policy, plan", [(False, "mapped", "mlp-depth"), (True, "sparkling", "hidden-copy")],
                         ids=["untied-mapped-mlp-depth", "tied-sparkling-hidden-copy"])
def test_grow_a_distributed_checkpoint_and_resume_on_other_world_sizes(tmp_path, trained, tied, policy, plan):
    source, grown_folder = trained(tied), str(tmp_path / "grown")

    grown = grow_distributed_checkpoint(source, config(tied), PLANS[plan](), grown_folder, policy=policy)
    losses, state, native = _reference(source, tied, PLANS[plan](), policy)
    assert set(grown.fresh) == {n for n, _ in native.named_parameters()} - {n.rsplit(".", 1)[0] for n in state}

    results = {}
    for world in (3, 1):
        out = str(tmp_path / f"world{world}.pt")
        _spawn(_resume_and_train, world, grown_folder, out)
        results[world] = torch.load(out, weights_only=True)
    for world, result in results.items():
        _assert_resumed_like_the_reference(result, losses, state, f"resumed on {world} processes")
    torch.testing.assert_close(results[3]["losses"], results[1]["losses"], rtol=0, atol=2e-5)


@pytest.mark.parametrize("tied, policy, plan", [(False, "mapped", "mlp-depth"), (True, "sparkling", "hidden-copy")],
                         ids=["untied-mapped-mlp-depth", "tied-sparkling-hidden-copy"])
def test_growth_inside_the_running_job_equals_the_growth_through_a_checkpoint(tmp_path, tied, policy, plan):
    source, out = str(tmp_path / "step3"), str(tmp_path / "online.pt")
    _spawn(_train_and_grow_online, 2, tied, plan, policy, source, out)
    losses, state, _ = _reference(source, tied, PLANS[plan](), policy)
    _assert_resumed_like_the_reference(torch.load(out, weights_only=True), losses, state, "grown online")


def test_the_grown_checkpoint_stores_large_tensors_in_row_chunks(tmp_path, trained):
    source, grown_folder = trained(False), str(tmp_path / "grown")
    grow_distributed_checkpoint(source, config(False), [passes.widen_mlp(factor=2)], grown_folder,
                                max_chunk_bytes=1024)
    checkpoint = DistributedCheckpoint(grown_folder)
    up = checkpoint.entries["model.model.layers.0.mlp.up_proj.weight"]  # 96 x 32 float32: 8 rows per chunk
    assert up.size == torch.Size([96, 32])
    assert [tuple(c.offsets) for c in up.chunks] == [(r, 0) for r in range(0, 96, 8)]
    assert checkpoint.value("optim.param_groups.0.lr") == 1e-2
    assert "model.layers.0.mlp.up_proj.weight" in checkpoint.value("optim.param_groups.0.params")
    assert transformers.AutoConfig.from_pretrained(grown_folder).intermediate_size == 96


def test_a_checkpoint_without_the_model_key_is_refused_by_name(tmp_path, trained):
    source = trained(False)
    with pytest.raises(GrowfxError, match="no model weights under 'weights'.*'model', 'optim'"):
        grow_distributed_checkpoint(source, config(False), [passes.widen_mlp(factor=2)], tmp_path / "out",
                                    model_key="weights")
    assert not (tmp_path / "out").exists()


def test_growth_split_by_keys_across_processes_writes_the_same_checkpoint(tmp_path, trained):
    source = trained(False)
    grow_distributed_checkpoint(source, config(False), [passes.widen_mlp(factor=2), passes.add_layers(1)],
                                tmp_path / "one", max_chunk_bytes=2048)
    _spawn(_grow, 2, source, str(tmp_path / "two"))
    one, two = DistributedCheckpoint(tmp_path / "one"), DistributedCheckpoint(tmp_path / "two")
    assert sorted(one.entries) == sorted(two.entries)
    writers = {info.relative_path.split("_")[2] for info in two.metadata.storage_data.values()}
    assert writers == {"0", "1"}  # both processes wrote their share (files __<rank>_<item>.distcp)
    for key in one.entries:
        if one.is_tensor(key):
            assert torch.equal(one.tensor(key), two.tensor(key)), key
        else:
            assert one.value(key) == two.value(key), key


def test_growfx_grow_grows_a_distributed_checkpoint_and_grows_the_result_again(tmp_path, trained, capsys):
    from rewrite.app.cli import main

    source = trained(False)
    config(False).save_pretrained(tmp_path / "config")
    with pytest.raises(SystemExit) as exit_:
        main(["grow", source, "--pass", "widen_mlp:factor=2", "--out", str(tmp_path / "once")])
    assert exit_.value.code == 2 and "without config.json: pass the model's Hugging Face config with --config" in \
        capsys.readouterr().err
    assert main(["grow", source, "--config", str(tmp_path / "config"), "--pass", "widen_mlp:factor=2",
                 "--optimizer", "sparkling", "--out", str(tmp_path / "once")]) == 0
    assert "0 state fields reset" in capsys.readouterr().out
    assert main(["grow", str(tmp_path / "once"), "--pass", "add_layers:n=1", "--out", str(tmp_path / "twice")]) == 0
    grown = transformers.AutoConfig.from_pretrained(tmp_path / "twice")
    assert (grown.intermediate_size, grown.num_hidden_layers) == (96, 3)
    checkpoint = DistributedCheckpoint(tmp_path / "twice")
    assert checkpoint.shape("optim.state.model.layers.2.mlp.up_proj.weight.exp_avg") == (96, 32)
    assert checkpoint.tensor("optim.state.model.layers.0.self_attn.q_proj.weight.step").item() == STEPS
