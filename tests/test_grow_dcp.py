"""A distributed checkpoint grown offline loads into the grown model as the in-memory growth makes it: weights
and optimizer state, bit for bit, over drawn plans, policies and tied or untied embeddings (one process; the
FSDP2 world sizes are in test_fsdp_growth.py)."""

import warnings

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import passes
import rewrite
from rewrite.errors import GrowfxError

transformers = pytest.importorskip("transformers")
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: E402

from rewrite.io.dcp_files import SafeLoadPlanner, SafeReader  # noqa: E402
from rewrite.training.grow_dcp import grow_distributed_checkpoint  # noqa: E402

IDS = torch.randint(0, 48, (2, 6), generator=torch.Generator().manual_seed(0))
PLANS = {
    "mlp": lambda: [passes.widen_mlp(factor=2)],
    "depth-zero": lambda: [passes.add_layers(1, at=0)],
    "depth-copy": lambda: [passes.add_layers(1, at=1, init="copy")],
    "hidden": lambda: [passes.widen_hidden(factor=2, init="clone")],
    "mlp+depth": lambda: [passes.widen_mlp(factor=3), passes.add_layers(2, init="copy")],
}


def llama(tied: bool, *, grown_from=None):
    config = grown_from or transformers.LlamaConfig(
        vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied, architectures=["LlamaForCausalLM"])
    return transformers.LlamaForCausalLM(config), config


def quietly(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        return function(*args, **kwargs)


def trained(tied: bool, steps: int, weight_decay: float):
    torch.manual_seed(steps)
    model, config = llama(tied)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(steps):
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, config, optimizer


def loaded(folder, model, optimizer):
    model_state, optim_state = get_state_dict(model, optimizer)
    quietly(dcp.load, {"model": model_state, "optim": optim_state}, storage_reader=SafeReader(folder),
            planner=SafeLoadPlanner(), no_dist=True)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)


@settings(max_examples=8, deadline=None)
@example(plan="mlp+depth", policy="mapped", copies="fresh", tied=False, steps=2, weight_decay=0.1)
@example(plan="hidden", policy="mapped", copies="source", tied=True, steps=1, weight_decay=0.0)
@example(plan="depth-copy", policy="sparkling", copies="source", tied=False, steps=3, weight_decay=0.1)
@given(plan=st.sampled_from(sorted(PLANS)), policy=st.sampled_from(["mapped", "sparkling", "reset"]),
       copies=st.sampled_from(["fresh", "source"]), tied=st.booleans(), steps=st.integers(1, 3),
       weight_decay=st.sampled_from([0.0, 0.1]))
def test_the_grown_checkpoint_holds_what_growing_in_memory_gives(tmp_path_factory, plan, policy, copies, tied,
                                                                  steps, weight_decay):
    work = tmp_path_factory.mktemp("dcp")
    model, config, optimizer = trained(tied, steps, weight_decay)
    model_state, optim_state = get_state_dict(model, optimizer)
    quietly(dcp.save, {"model": model_state, "optim": optim_state}, checkpoint_id=work / "source", no_dist=True)

    written = grow_distributed_checkpoint(work / "source", config, PLANS[plan](), work / "grown", policy=policy,
                                          copies=copies, max_chunk_bytes=256)
    grown = rewrite.apply(model, PLANS[plan](), (IDS,))
    native = rewrite.to_native(grown, model)
    carried = rewrite.carry(optimizer, grown, native, policy=policy, copies=copies, protect=False)

    resumed, _ = llama(tied, grown_from=transformers.AutoConfig.from_pretrained(work / "grown"))
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-2, weight_decay=weight_decay)
    loaded(work / "grown", resumed, resumed_optimizer)
    expected = native.state_dict()
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, expected[name]), name
    reference = {name: carried.optimizer.state.get(p, {}) for name, p in native.named_parameters()}
    assert sorted(written.fresh) == sorted(name for name, state in reference.items() if not state)
    for name, parameter in resumed.named_parameters():
        state = resumed_optimizer.state[parameter]
        for field, value in state.items():
            want = reference[name].get(field, torch.zeros_like(value))  # fresh: Adam's start, zeros and step 0
            assert torch.equal(value, want), f"{field} of {name}"
    assert resumed_optimizer.param_groups[0]["weight_decay"] == weight_decay


def test_an_unknown_policy_is_refused_before_anything_is_read(tmp_path):
    with pytest.raises(GrowfxError, match="unknown optimizer policy 'fancy'; choose one of mapped, sparkling, reset"):
        grow_distributed_checkpoint(tmp_path / "missing", None, [], tmp_path / "out", policy="fancy")


def test_a_folder_that_is_not_a_checkpoint_is_named(tmp_path):
    with pytest.raises(GrowfxError, match=f"{tmp_path} is not a distributed checkpoint"):
        grow_distributed_checkpoint(tmp_path, None, [], tmp_path / "out")


def test_an_upcycle_is_refused_before_anything_is_written(tmp_path):
    """Into a mixture class the experts are stacked, and the optimizer state with them: not built for a DCP
    checkpoint, so it is refused by name instead of failing on the first stacked tensor."""
    model, config, optimizer = trained(False, 1, 0.0)
    model_state, optim_state = get_state_dict(model, optimizer)
    quietly(dcp.save, {"model": model_state, "optim": optim_state}, checkpoint_id=tmp_path / "source", no_dist=True)
    with pytest.raises(rewrite.NotRepresentableError, match="MixtralForCausalLM, whose experts are stacked: growing "
                                                            "a distributed checkpoint into it is not built"):
        grow_distributed_checkpoint(tmp_path / "source", config, [passes.upcycle_moe(4, 2)], tmp_path / "grown")
    assert not (tmp_path / "grown").exists()
