"""The growth map: every grown tensor made from the original's tensors, without the graph.

Property: for architectures drawn from the zoo and random plans (width with every policy, heads, hidden,
depth, residual splitting, MoE, Net2Deeper, a user rule), ``grown.map.apply(original state dict)`` equals the
grown module's state dict bit for bit, a map restored from JSON applies identically, and ``new_entries`` marks
exactly the entries growth added.
"""

import json

import pytest
import torch
from conftest import assert_same_state, grow, tiny_gpt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import passes
import rewrite
from rewrite.app.zoo.handwritten import GPT, Llama


def low_rank_adapter():
    """The README's user rule: a zero-initialised adapter after the attention output projection."""

    @rewrite.rule(rewrite.op("linear", "proj", module="*attn.o*"))
    def adapter(match, edit):
        name = f"{match.module('proj')}_adapter"
        out = match["proj"]
        width = match.graph.shape(out)[-1]
        a = edit.add_parameter(f"{name}.A", torch.randn(2, width) / width**0.5)
        b = edit.add_parameter(f"{name}.B", torch.zeros(width, 2))
        low = edit.at(out).linear(out, a)
        up = edit.linear(low, b)
        total = edit.call(torch.ops.aten.add.Tensor, out, up)
        edit.replace_uses(out, total, keep={low, total})

    return adapter


@st.composite
def models(draw):
    kind = draw(st.sampled_from(["llama", "gpt"]))
    heads = draw(st.sampled_from([2, 4]))
    kv = heads // draw(st.sampled_from([1, 2])) if kind == "llama" else heads
    torch.manual_seed(draw(st.integers(0, 1000)))
    if kind == "llama":
        model = Llama(vocab=32, dim=heads * 4, heads=heads, kv_heads=kv, hidden=draw(st.integers(8, 24)), layers=2)
    else:
        model = GPT(vocab=32, dim=heads * 4, heads=heads, hidden=draw(st.integers(8, 24)), layers=2)
    return model.eval(), heads // kv


@st.composite
def plans(draw, ratio):
    plan = []
    for _ in range(draw(st.integers(1, 4))):
        which = draw(st.sampled_from(["mlp", "heads", "value", "hidden", "layers", "split", "moe", "adapter"]))
        init = draw(st.sampled_from(["zero", "clone", "net2net", "sparkling"]))
        seed = draw(st.integers(0, 3))
        if which == "mlp":
            plan.append(passes.widen_mlp(factor=draw(st.sampled_from([1.5, 2])), init=init, exact=False, seed=seed))
        elif which == "heads":
            plan.append(passes.add_heads(ratio * draw(st.integers(1, 2)), init=init, exact=False, seed=seed))
        elif which == "value":
            plan.append(passes.widen_heads(v=draw(st.integers(5, 8)), init=init, exact=False, seed=seed))
        elif which == "hidden":
            plan.append(passes.widen_hidden(factor=2, init=draw(st.sampled_from(["zero", "clone"])), seed=seed))
        elif which == "layers":
            plan.append(passes.add_layers(draw(st.integers(1, 2)), at=draw(st.sampled_from([None, 0])),
                                          init=draw(st.sampled_from(["zero", "copy"])), seed=seed))
        elif which == "split":
            plan.append(passes.split_layers(2, layers=[0]))
        elif which == "moe":
            plan.append(passes.upcycle_moe(draw(st.integers(2, 3)), top_k=1, seed=seed))
        else:
            plan.append(low_rank_adapter())
    return plan


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models(), st.data())
def test_property_the_map_rebuilds_the_grown_state_dict_bit_for_bit(drawn, data):
    model, ratio = drawn
    plan = data.draw(plans(ratio))
    ids = torch.randint(0, 32, (2, 6))
    try:
        grown = rewrite.apply(model, plan, (ids,), verify=False)
    except rewrite.GrowthError as refusal:
        assert str(refusal).strip()
        return
    original = model.state_dict()
    expected = grown.module.state_dict()
    assert_same_state(grown.map.apply(original), expected)
    restored = rewrite.GrowthMap.from_dict(json.loads(json.dumps(grown.map.to_dict())))
    assert_same_state(restored.apply(original), expected)
    for name in grown.map.names(persistent_only=True):
        mask = grown.map.new_entries(name)
        assert mask.shape == expected[name].shape
        assert torch.equal(restored.new_entries(name), mask)


def test_new_entries_of_widen_mlp_zero_are_the_new_rows_and_columns():
    torch.manual_seed(0)
    model = Llama(vocab=32, dim=16, heads=4, kv_heads=2, hidden=24, layers=2).eval()
    ids = torch.randint(0, 32, (2, 6))
    grown = rewrite.apply(model, [passes.widen_mlp(size=40, init="zero")], (ids,))
    mlp = "blocks.0.mlp"
    for name in (f"{mlp}.gate.weight", f"{mlp}.up.weight"):
        mask = grown.map.new_entries(name)
        assert mask.shape == (40, 16)
        assert not mask[:24].any() and mask[24:].all()
    down = grown.map.new_entries(f"{mlp}.down.weight")
    assert down.shape == (16, 40)
    assert not down[:, :24].any() and down[:, 24:].all()
    assert not grown.map.new_entries("blocks.0.attn.q.weight").any()
    # the new columns of the down projection are zero, which is what makes the growth exact
    assert torch.count_nonzero(grown.module.state_dict()[f"{mlp}.down.weight"][:, 24:]) == 0
    assert f"{mlp}.down.weight [16x24] -> [16x40]: columns 0-23 kept, 24-39 zero" in str(grown.map)


def test_copies_and_new_tensors_are_all_new_and_say_where_they_come_from():
    torch.manual_seed(0)
    model = GPT(vocab=32, dim=16, heads=4, hidden=24, layers=2).eval()
    ids = torch.randint(0, 32, (2, 6))
    grown = rewrite.apply(model, [passes.add_layers(1, at=0), passes.upcycle_moe(2, top_k=1, layers=[0])], (ids,))
    copied = grown.map.recipes["blocks.1.attn.q.weight"]
    assert (copied.role, copied.source) == ("copy", "blocks.0.attn.q.weight")
    assert grown.map.new_entries("blocks.1.attn.q.weight").all()
    moved = grown.map.recipes["blocks.2.attn.q.weight"]  # the old block 1, renumbered
    assert (moved.role, moved.source) == ("kept", "blocks.1.attn.q.weight")
    assert not grown.map.new_entries("blocks.2.attn.q.weight").any()
    router = grown.map.recipes["blocks.0.router.weight"]  # the MLP of a GPT block is fc -> proj in the block
    assert router.role == "new" and router.start.kind == "normal" and router.start.std == 0.02
    expert = grown.map.recipes["blocks.0.experts.1.fc.weight"]
    assert (expert.role, expert.source) == ("copy", "blocks.0.fc.weight")
    assert "blocks.0.fc.weight" in grown.map.removed
    zeroed = grown.map.recipes["blocks.1.attn.o.weight"]  # the copy's branch output scaled by 0
    assert any(isinstance(op, rewrite.Scale) and op.factor == 0.0 for op in zeroed.ops)


def test_the_grown_module_uses_the_original_names():
    torch.manual_seed(0)
    model = Llama(vocab=32, dim=16, heads=4, kv_heads=2, hidden=24, layers=2).eval()
    ids = torch.randint(0, 32, (2, 6))
    grown = rewrite.apply(model, [passes.widen_mlp(factor=2)], (ids,))
    assert set(grown.module.state_dict()) == set(model.state_dict())
    loaded = Llama(vocab=32, dim=16, heads=4, kv_heads=2, hidden=48, layers=2).eval()
    loaded.load_state_dict(grown.module.state_dict())
    assert torch.allclose(loaded(ids), model(ids), atol=1e-6)


def test_an_opaque_tensor_is_stored_and_said_to_be_opaque():
    model, ids = tiny_gpt()

    @rewrite.rule(rewrite.op("linear", "fc", module="*.fc"))
    def perturb(match, edit):
        weight = match.weight("fc")
        edit.set_tensor(weight, edit.tensor(weight).detach().sin())

    grown = rewrite.apply(model, [perturb], (ids,), verify=False)
    recipe = grown.map.recipes["blocks.0.fc.weight"]
    assert recipe.role == "new" and recipe.start.kind == "value" and "opaque" in recipe.note
    assert torch.equal(grown.map.apply(model.state_dict())["blocks.0.fc.weight"],
                       model.state_dict()["blocks.0.fc.weight"].sin())
    assert "opaque" in grown.map.how("blocks.0.fc.weight")


def test_the_map_of_hugging_face_models_rebuilds_them_too():
    """On both front-ends' graphs: export's Llama (rotary buffers kept out of the state dict) and GPT-2's
    Conv1D with its tied head, through width, heads and depth."""
    for name, plan in (("hf-llama", [passes.add_heads(2), passes.widen_mlp(factor=2), passes.add_layers(1, at=0)]),
                       ("hf-gpt2", [passes.widen_mlp(factor=2, init="net2net"), passes.upcycle_moe(2, top_k=1)])):
        built, grown = grow(name, *plan)
        expected = grown.module.state_dict()
        kept = set(built.model.state_dict()) - set(grown.map.removed)  # upcycling removes the dense MLPs
        assert kept and set(expected) >= kept  # the original names, nothing prefixed or renamed
        assert_same_state(grown.map.apply(built.model.state_dict()), expected)


def test_growing_a_grown_graph_again_maps_from_that_graph():
    """Two apply calls in a row (what a training loop does at its second growth): the second map's sources are
    the first result's tensors, and its verification projects onto that graph's nodes."""
    torch.manual_seed(0)
    model = Llama(vocab=32, dim=16, heads=4, kv_heads=2, hidden=24, layers=2).eval()
    ids = torch.randint(0, 32, (2, 6))
    first = rewrite.apply(model, [passes.widen_mlp(size=40)], (ids,))
    second = rewrite.apply(first.graph, [passes.widen_mlp(size=80, init="clone")], (ids,))
    down = second.map.recipes["blocks.0.mlp.down.weight"]
    assert down.source == "blocks.0.mlp.down.weight" and len(down.ops) == 2  # one Take and its Split
    assert second.map.original["blocks.0.mlp.down.weight"][0] == (16, 40)
    assert_same_state(second.map.apply(first.module.state_dict()), second.module.state_dict())
    assert second.report.passes[0].verification.max_abs_error < 1e-5


def test_a_map_whose_draws_another_scheme_made_is_refused_and_one_without_draws_still_loads():
    """Maps written before the chunked draws (format /1) cannot remake seeded values: refused with the reason;
    a /1 map with no seeded op remakes its tensors as before."""
    built, noisy = grow("llama", passes.widen_mlp(factor=2, init="sparkling", exact=False), verify=False)
    old = json.loads(json.dumps(noisy.map.to_dict()))
    old["format"] = "growfx.growth_map/1"
    del old["draws"]
    with pytest.raises(ValueError, match="another scheme"):
        rewrite.GrowthMap.from_dict(old)
    built, plain = grow("llama", passes.widen_mlp(factor=2, init="clone"), verify=False)
    old = json.loads(json.dumps(plain.map.to_dict()))
    old["format"] = "growfx.growth_map/1"
    del old["draws"]
    state = {n: t.detach() for n, t in built.model.state_dict().items()}
    remade = rewrite.GrowthMap.from_dict(old).apply(state)
    for name, value in plain.module.state_dict().items():
        assert torch.equal(remade[name], value), name
