"""Planning every pass on shapes, then building each tensor once, gives the bits building pass by pass gives.

``rewrite.apply`` plans on a copy of the graph whose tensors are on ``meta`` and then makes every grown tensor
from the original's (``rewrite.transform.materialise``); ``plan_first=False`` is the old way, every pass
building its tensors from the previous pass's. Both must give the same module, bit for bit, for every pass,
policy and dtype, and the built-in passes must never need the weights to plan.
"""

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import passes
import rewrite
from conftest import assert_same_state, tiny_gpt, traced
from rewrite.app.zoo.handwritten import Llama
from test_property_growth import models, steps

PLANNED = "planned on shapes, each tensor built once"


def both_ways(model, plan, args, kwargs=None, verify=False):
    """(planned first, built pass by pass), or None when the plan is refused (both must refuse alike)."""
    try:
        first = rewrite.apply(model, plan, args, kwargs, verify=verify)
    except rewrite.GrowthError as refusal:
        with pytest.raises(type(refusal)) as again:
            rewrite.apply(model, plan, args, kwargs, verify=verify, plan_first=False)
        assert str(again.value) == str(refusal)
        return None
    return first, rewrite.apply(model, plan, args, kwargs, verify=verify, plan_first=False)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models(), st.data(), st.sampled_from([torch.float32, torch.bfloat16]))
def test_property_planning_first_gives_the_bits_of_building_pass_by_pass(drawn, data, dtype):
    kind, model, ratio = drawn
    model = model.to(dtype)
    plan = data.draw(steps(ratio))
    ids = torch.randint(0, 32, (2, 6))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    ways = both_ways(model, plan, (ids,))
    if ways is None:
        return
    first, by_pass = ways
    assert first.report.how == PLANNED, first.report.how
    assert_same_state(first.module.state_dict(), by_pass.module.state_dict())
    assert_same_state(first.map.apply(model.state_dict()), first.module.state_dict())
    assert_same_state(model.state_dict(), before)  # the original is never modified
    own = {t.data_ptr() for t in model.state_dict().values()}
    assert not any(t.data_ptr() in own for t in first.module.state_dict().values())  # nor shared
    torch.testing.assert_close(first.module(ids), by_pass.module(ids), rtol=0, atol=0)


ZOO_PLANS = {
    "widen_mlp": lambda: [passes.widen_mlp(factor=2, init="clone")],
    "widen_hidden": lambda: [passes.widen_hidden(factor=2, init="clone")],
    "add_layers(copy)": lambda: [passes.add_layers(1, init="copy")],
    "add_layers(at=0)": lambda: [passes.add_layers(2, at=0)],
    "split_layers": lambda: [passes.split_layers(2, layers=[0])],
    "upcycle_moe": lambda: [passes.upcycle_moe(3, 2)],
    "three passes": lambda: [passes.widen_mlp(factor=2), passes.add_layers(1, init="copy"),
                             passes.widen_hidden(factor=2, init="clone")],
    "widths then a layer": lambda: [passes.widen_hidden(factor=2), passes.widen_mlp(factor=2),
                                    passes.add_layers(1, at=0)],
}


@pytest.mark.parametrize("name", ["gpt", "llama", "hf-gpt2", "hf-llama", "hf-qwen2", "hf-bert", "hf-mixtral"])
@pytest.mark.parametrize("plan", list(ZOO_PLANS))
def test_the_built_in_passes_plan_on_shapes_on_fx_and_export_graphs(name, plan):
    built, graph = traced(name)
    ways = both_ways(graph, ZOO_PLANS[plan](), built.args, built.kwargs, verify=True)
    if ways is None:
        return
    first, by_pass = ways
    assert first.report.how == PLANNED, first.report.how
    assert_same_state(first.module.state_dict(), by_pass.module.state_dict())
    for mine, theirs in zip(first.report.passes, by_pass.report.passes):
        assert (mine.verification is None) == (theirs.verification is None)
        if mine.verification is not None:
            assert mine.verification.max_abs_error == theirs.verification.max_abs_error


@pytest.mark.parametrize("name", ["gpt", "llama", "hf-llama"])
@pytest.mark.parametrize("plan", ["three passes", "widths then a layer", "upcycle_moe"])
def test_passes_editing_the_graph_the_one_before_made_give_what_editing_copies_gives(name, plan):
    """``verify=False``: each pass edits the intermediate graph the one before made (and the first edits the
    planning copy) instead of a copy of it (``Graph.in_place``); ``verify=True`` keeps the intermediates. The same
    grown tensors, code and growth map either way, and the traced graph is left as it was."""
    built, graph = traced(name)
    code, tensors = graph.module.code, dict(graph.module.state_dict(keep_vars=True))
    modules = [name for name, _ in graph.module.named_modules()]
    try:
        edited = rewrite.apply(graph, ZOO_PLANS[plan](), built.args, built.kwargs, verify=False)
    except rewrite.GrowthError as refusal:  # refused alike either way
        with pytest.raises(type(refusal), match=re.escape(str(refusal))):
            rewrite.apply(graph, ZOO_PLANS[plan](), built.args, built.kwargs, verify=True)
        return
    copied = rewrite.apply(graph, ZOO_PLANS[plan](), built.args, built.kwargs, verify=True)
    assert edited.report.how == copied.report.how == PLANNED
    assert_same_state(edited.module.state_dict(), copied.module.state_dict())
    assert edited.graph.module.code == copied.graph.module.code
    assert edited.map.to_dict() == copied.map.to_dict()
    assert edited.map.original == rewrite.GrowthMap.identity(graph.module).original  # the traced model's tensors
    fields = ("parameters_before", "parameters_after", "added", "removed", "resized", "renamed", "notes")
    for mine, theirs in zip(edited.report.passes, copied.report.passes, strict=True):
        assert [getattr(mine, f) for f in fields] == [getattr(theirs, f) for f in fields]
    assert graph.module.code == code and [name for name, _ in graph.module.named_modules()] == modules
    assert all(graph.module.state_dict(keep_vars=True)[n] is t for n, t in tensors.items())


def test_net2deeper_plans_on_shapes_and_keeps_its_identity_layer():
    built, graph = traced("cnn")
    first, by_pass = both_ways(graph, [passes.net2deeper("conv1")], built.args, built.kwargs, verify=True)
    assert first.report.how == PLANNED
    assert_same_state(first.module.state_dict(), by_pass.module.state_dict())


def test_a_rule_that_reads_the_weights_is_built_pass_by_pass_and_says_so():
    model, ids = tiny_gpt()

    @rewrite.rule(rewrite.op("linear", "fc", module="*.fc"))
    def perturb(match, edit):
        weight = match.weight("fc")
        edit.set_tensor(weight, edit.tensor(weight).detach().sin())

    @rewrite.rule(rewrite.op("linear", "fc", module="*.fc"))
    def halve_if_large(match, edit):
        weight = match.weight("fc")
        if edit.tensor(weight).abs().max() > 0:  # reads a value: cannot run on meta
            edit.transform(weight, rewrite.Scale(0.5))

    for rule, why in ((perturb, "computes blocks.0.fc.weight from the weights' values"),
                      (halve_if_large, "reads the weights' values")):
        grown = rewrite.apply(model, [passes.widen_mlp(factor=2), rule], (ids,), verify=False)
        assert grown.report.how.startswith("built pass by pass") and why in grown.report.how, grown.report.how
        assert set(grown.report.seconds) == {"plan and build"}
        by_pass = rewrite.apply(model, [passes.widen_mlp(factor=2), rule], (ids,), verify=False, plan_first=False)
        assert_same_state(grown.module.state_dict(), by_pass.module.state_dict())


def test_the_report_times_planning_building_and_verifying():
    torch.manual_seed(0)
    model = Llama(vocab=32, dim=16, heads=4, kv_heads=2, hidden=24, layers=2).eval()
    ids = torch.randint(0, 32, (2, 6))
    grown = rewrite.apply(model, [passes.widen_mlp(factor=2), passes.add_layers(1)], (ids,))
    assert set(grown.report.seconds) == {"plan", "build", "verify"}
    assert all(seconds >= 0 for seconds in grown.report.seconds.values())
    assert PLANNED in str(grown.report)


def test_a_bfloat16_tensor_two_passes_scale_is_rounded_after_each_pass_as_before():
    """``widen_hidden`` scales RMSNorm gains by sqrt(2), which bfloat16 rounds: twice in a row, the gains are
    rounded after each pass when built pass by pass, so a build in one go would differ in the last bit."""
    torch.manual_seed(0)
    model = Llama(vocab=32, dim=16, heads=4, kv_heads=2, hidden=24, layers=1).eval()
    for norm in (m for m in model.modules() if hasattr(m, "weight") and m.weight.dim() == 1):
        torch.nn.init.uniform_(norm.weight, 0.5, 1.5)  # gains that round differently, not all ones
    model = model.to(torch.bfloat16)
    ids = torch.randint(0, 32, (2, 6))
    plan = [passes.widen_hidden(factor=2), passes.widen_hidden(factor=2)]
    first, by_pass = both_ways(model, plan, (ids,))
    assert first.report.how == PLANNED
    assert_same_state(first.module.state_dict(), by_pass.module.state_dict())
    gains = [name for name, recipe in first.map.recipes.items()
             if sum(type(op).__name__ == "Scale" for op in recipe.ops) == 2]
    assert gains  # the case this test is about: two roundings of one tensor


def test_noise_a_later_pass_draws_keeps_the_scale_of_that_pass_s_input():
    """Noise is scaled by the std of the tensor before the last ``Take``; a pass that adds noise without a
    Take of its own scales it by its own input (the MLP zero-padded by the pass before), not the original's."""
    model, ids = tiny_gpt()

    @rewrite.rule(rewrite.op("linear", "fc", module="*.fc"))
    def jitter(match, edit):
        weight = match.weight("fc")
        rows = edit.tensor(weight).shape[0]
        edit.transform(weight, rewrite.Noise(0, torch.arange(rows), seed=7, relative=0.1))

    plan = [passes.widen_mlp(factor=2), jitter]
    first, by_pass = both_ways(model, plan, (ids,))
    assert first.report.how == PLANNED
    assert_same_state(first.module.state_dict(), by_pass.module.state_dict())


@st.composite
def takes_on_axes(draw):
    """A tensor's shape and Takes on distinct axes of it: kept units, then copies, zeros or a random map."""
    rank = draw(st.integers(1, 3))
    shape = [draw(st.integers(1, 6)) for _ in range(rank)]
    axes = draw(st.permutations(range(rank)))[:draw(st.integers(1, rank))]
    takes = []
    for axis in axes:
        old = shape[axis]
        new = draw(st.integers(old, 3 * old))
        fill = draw(st.sampled_from(["zero", "copy", "random"]))
        extra = {"zero": [-1] * (new - old), "copy": [j % old for j in range(new - old)],
                 "random": draw(st.lists(st.integers(-1, old - 1), min_size=new - old, max_size=new - old))}[fill]
        index = torch.tensor(list(range(old)) + extra, dtype=torch.long)
        takes.append(rewrite.Take(axis, index, torch.arange(old), fill))
    return shape, takes


@settings(max_examples=60, deadline=None)
@given(takes_on_axes(), st.integers(0, 1000))
def test_property_takes_on_several_axes_at_once_give_what_taking_one_axis_after_another_gives(drawn, seed):
    from rewrite.transform.run_ops import run_ops
    from rewrite.transform.take import take as _take, take_together as _take_together

    shape, takes = drawn
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    one_by_one = x
    for take in takes:
        one_by_one = _take(one_by_one, take.axis, take.index)
    assert torch.equal(_take_together(x, takes, max_blocks=10**6), one_by_one)
    assert torch.equal(run_ops(x, takes), one_by_one)


@settings(max_examples=60, deadline=None)
@given(takes_on_axes(), st.integers(0, 1000), st.sampled_from([1, 2, 16]))
def test_property_a_take_is_index_select_with_zeros_where_the_index_is_minus_one(drawn, seed, max_runs):
    """``_take`` by slices (kept units, copied blocks, a run of new zeros) or, past ``max_runs`` runs, by one
    gather of the rest: always ``index_select`` of the source with zeros at the new positions."""
    from rewrite.transform.take import take as _take

    shape, takes = drawn
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    for take in takes:
        expected = x.index_select(take.axis, take.index.clamp(min=0))
        new = (take.index < 0).nonzero().flatten()
        expected.index_fill_(take.axis, new, 0.0)
        assert torch.equal(_take(x, take.axis, take.index, max_runs=max_runs), expected)


@settings(max_examples=60, deadline=None)
@given(takes_on_axes(), st.integers(0, 1000), st.sampled_from([1, 2, 16]),
       st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_property_a_take_then_a_split_is_made_in_one_pass_with_the_products_of_taking_then_dividing(
        drawn, seed, max_runs, dtype):
    """``run_ops`` makes a Take followed by a Split on its axis in one pass (``_take(..., factors=)``): the
    values of taking, then multiplying by the reciprocals of the replica counts (in float32 for bfloat16),
    then rounding, bit for bit."""
    from rewrite.transform import run_ops as growth_ops
    from rewrite.transform.take import take as _take

    shape, takes = drawn
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    for take in takes:
        divisors = torch.randint(1, 6, (len(take.index),), generator=torch.Generator().manual_seed(seed + 1))
        arithmetic = torch.float32 if dtype == torch.bfloat16 else dtype
        rank = x.dim()
        along = [-1 if axis == take.axis else 1 for axis in range(rank)]
        expected = (_take(x, take.axis, take.index).to(arithmetic)
                    .mul_(divisors.to(arithmetic).reciprocal().view(along)).to(dtype))
        fused = _take(x, take.axis, take.index, max_runs=max_runs,
                      factors=divisors.to(arithmetic).reciprocal()).to(dtype)
        assert torch.equal(fused, expected)
        assert torch.equal(growth_ops.run_ops(x, [take, rewrite.Split(take.axis, divisors)]), expected)



@pytest.mark.parametrize("name", ["gpt", "llama", "hf-gpt2", "hf-llama", "hf-bert", "hf-mixtral", "cnn"])
@pytest.mark.parametrize("plan", ["add_layers(copy)", "add_layers(at=0)", "split_layers", "upcycle_moe",
                                  "three passes", "widths then a layer"])
def test_shapes_a_structural_rule_records_on_meta_are_those_running_the_whole_graph_gives(name, plan):
    """On meta, ``Editor.finish`` computes again only the nodes an edit touched and what their shapes change.
    (Strides may differ: the traced graph's were recorded on CPU, a whole run on meta records meta kernels'.)"""
    from rewrite.transform.materialise import on_meta

    built, graph = traced(name)
    planned = on_meta(graph)
    try:
        grown = rewrite.apply(planned, ZOO_PLANS[plan](), planned.example_args, planned.example_kwargs,
                              verify=False).graph
    except rewrite.GrowthError:
        return
    recorded = {node.name: (grown.shape(node), grown.dtype(node)) for node in grown.nodes}
    grown.propagate_shapes(*grown.example_args, **grown.example_kwargs)
    assert recorded == {node.name: (grown.shape(node), grown.dtype(node)) for node in grown.nodes}



@settings(max_examples=80, deadline=None)
@given(takes_on_axes(), st.integers(1, 60), st.booleans(), st.integers(0, 1000),
       st.sampled_from([torch.bfloat16, torch.float16]), st.sampled_from([16, 64, 1 << 20]), st.booleans())
def test_property_noise_last_on_a_bfloat16_tensor_is_the_float32_growth_rounded_once(drawn, width, scattered, seed,
                                                                                      dtype, piece, redraw):
    """Noise (or a redraw after it) as a bfloat16/float16 tensor's last op is drawn piece by piece in float32
    (no float32 copy of the whole tensor): the bits of growing it in float32 and rounding once, for any piece
    size."""
    from rewrite.transform import draws
    from rewrite.transform.growth_ops import Redraw
    from rewrite.transform.run_ops import run_ops

    shape, takes = drawn
    x = torch.randn([*shape, width], generator=torch.Generator().manual_seed(seed))  # rows of up to 60 values
    take = takes[-1]
    new = len(take.index)
    positions = (torch.randperm(new, generator=torch.Generator().manual_seed(seed))[:max(1, new // 2)].sort()[0]
                 if scattered else torch.arange(shape[take.axis], new) if new > shape[take.axis] else torch.arange(new))
    ops = [*takes, rewrite.Noise(take.axis, positions, seed=seed + 1, relative=0.5)]
    ops += [Redraw(seed + 2)] if redraw else []
    before, draws.PIECE = draws.PIECE, piece
    try:
        low = run_ops(x.to(dtype), ops)
    finally:
        draws.PIECE = before
    assert low.dtype == dtype  # bit for bit (a redraw of one value has std nan, both ways)
    torch.testing.assert_close(low, run_ops(x.to(dtype).float(), ops).to(dtype), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("shape", [(16,), (17,), (33,), (50,), (1000,), (50, 3), (7, 5), (3, 50), (1, 40), (40, 1),
                                   (3, 70000), (70000, 3)])
@pytest.mark.parametrize("piece", [1, 16, 48, 1 << 20])
@pytest.mark.parametrize("chunk", [16, 100, 1 << 16])
def test_noise_in_pieces_adds_the_values_of_one_draw_of_the_whole_shape(shape, piece, chunk, monkeypatch):
    """Whatever the pieces and however they cut the chunks of the draw: the values of the whole draw, in
    row-major order, added in float32 and rounded once."""
    from rewrite.transform import draws

    monkeypatch.setattr(draws, "CHUNK", chunk)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).bfloat16()
    whole = x.float().add_(draws.normal(math.prod(shape), 9).view(shape), alpha=0.25).bfloat16()
    monkeypatch.setattr(draws, "PIECE", piece)
    draws.add_(x, 9, 0.25)
    assert torch.equal(x, whole)
    chunks = [torch.randn(min(chunk, math.prod(shape) - at),
                          generator=torch.Generator().manual_seed(draws.chunk_seed(9, at // chunk)))
              for at in range(0, math.prod(shape), chunk)]
    assert torch.equal(draws.normal(math.prod(shape), 9), torch.cat(chunks))  # the scheme, as documented


@settings(max_examples=60, deadline=None)
@given(takes_on_axes(), st.integers(1, 60), st.integers(0, 1000), st.sampled_from([torch.float32, torch.float64]),
       st.sampled_from([16, 48]), st.booleans())
def test_property_noise_drawn_in_pieces_is_noise_drawn_at_once(drawn, width, seed, dtype, piece, redraw):
    """Noise is added piece by piece (no scratch of the region's size): the bits of one draw of the region."""
    from rewrite.transform import draws
    from rewrite.transform.growth_ops import Redraw
    from rewrite.transform.run_ops import run_ops

    shape, takes = drawn
    x = torch.randn([*shape, width], generator=torch.Generator().manual_seed(seed), dtype=dtype)
    take = takes[-1]
    ops = [*takes, rewrite.Noise(take.axis, torch.arange(len(take.index)), seed=seed + 1, relative=0.5),
           rewrite.Scale(1.5, 0.0, None, None)] + ([Redraw(seed + 2)] if redraw else [])
    before = draws.PIECE
    try:
        draws.PIECE = piece
        pieces = run_ops(x, ops)
        draws.PIECE = 1 << 40
        at_once = run_ops(x, ops)
    finally:
        draws.PIECE = before
    torch.testing.assert_close(pieces, at_once, rtol=0, atol=0, equal_nan=True)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=3), st.integers(0, 1000),
       st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), st.sampled_from([16, 48, 1 << 20]))
def test_property_a_redraw_is_one_seeded_draw_of_the_whole_shape_at_the_tensor_s_scale(shape, seed, dtype, piece):
    """A redraw (drawn straight into the result, piece by piece) is the draw of its seed in the shape's
    row-major order, times the tensor's standard deviation, in float32 and rounded once to the tensor's dtype."""
    from rewrite.transform import draws
    from rewrite.transform.growth_ops import Redraw
    from rewrite.transform.run_ops import run_ops

    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    std = float(x.float().std())
    expected = draws.normal(math.prod(shape), seed + 1).view(shape).mul_(std)
    before = draws.PIECE
    try:
        draws.PIECE = piece
        made = run_ops(x, [Redraw(seed + 1)])
    finally:
        draws.PIECE = before
    torch.testing.assert_close(made, expected.to(dtype), rtol=0, atol=0, equal_nan=True)


@st.composite
def a_pass(draw, shape):
    """One pass's ops on a tensor of ``shape``: maybe noise first, Takes, then noise, a scaling or a redraw."""
    from rewrite.transform.growth_ops import Redraw

    ops, shape = [], list(shape)
    seed = draw(st.integers(0, 10**6))
    axis = draw(st.integers(0, len(shape) - 1))
    if draw(st.booleans()):
        ops.append(rewrite.Noise(axis, torch.arange(shape[axis]), seed, 0.3))
    for _ in range(draw(st.integers(0, 2))):
        axis = draw(st.integers(0, len(shape) - 1))
        extra = draw(st.integers(0, 3))
        index = torch.tensor(list(range(shape[axis])) + [j % shape[axis] for j in range(extra)])
        ops.append(rewrite.Take(axis, index, torch.arange(shape[axis]), "copy"))
        shape[axis] += extra
    tail = draw(st.sampled_from(["noise", "scale", "redraw", "none"]))
    if tail == "noise":
        ops.append(rewrite.Noise(axis, torch.arange(shape[axis]), seed + 1, 0.2))
    elif tail == "scale":
        ops.append(rewrite.Scale(0.7, 0.0, None, None))
    elif tail == "redraw":
        ops.append(Redraw(seed + 2))
    return ops, shape


@settings(max_examples=80, deadline=None)
@given(st.data(), st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_property_two_passes_composed_give_the_bits_of_running_them_one_after_another(data, dtype):
    """``run_ops(x, composed(a, b)) == run_ops(run_ops(x, a), b)`` for a plan in ``dtype`` (a ``PassEnd`` where
    they would not join); and a float32 plan run on bfloat16/float16 weights (a checkpoint streamed in its
    stored dtype) rounds once, at the end, as growing it in float32 and storing it does."""
    from rewrite.transform.growth_ops import composed
    from rewrite.transform.run_ops import run_ops

    start = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    a, middle = data.draw(a_pass(start))
    b, _ = data.draw(a_pass(middle))
    x = torch.randn(start, generator=torch.Generator().manual_seed(1)).to(dtype)
    torch.testing.assert_close(run_ops(x, composed(dtype, tuple(a), tuple(b))), run_ops(run_ops(x, a), b),
                               rtol=0, atol=0, equal_nan=True)
    in_float32 = run_ops(x.float(), composed(torch.float32, tuple(a), tuple(b))).to(dtype)
    torch.testing.assert_close(run_ops(x, composed(torch.float32, tuple(a), tuple(b))), in_float32,
                               rtol=0, atol=0, equal_nan=True)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_property_draw_counts_are_the_normal_values_the_ops_draw(data):
    """``draw_counts`` (what a build's order and the benchmarks count) is how many normal values ``run_ops``
    draws, op by op, for two passes of noise, Takes, scalings and redraws."""
    from rewrite.transform import growth_ops, run_ops, work

    start = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    a, middle = data.draw(a_pass(start))
    b, end = data.draw(a_pass(middle))
    axis = data.draw(st.integers(0, len(end) - 1))
    positions = data.draw(st.lists(st.integers(0, end[axis] - 1), min_size=1, unique=True))
    some = rewrite.Noise(axis, torch.tensor(sorted(positions)), seed=5, relative=0.1)  # noise on some units
    ops = (*growth_ops.composed(torch.float32, tuple(a), tuple(b)), some)
    drawn, randn = [], torch.randn

    def counting(shape, *args, **kwargs):
        drawn.append(math.prod(shape))
        return randn(shape, *args, **kwargs)

    x = torch.randn(start, generator=torch.Generator().manual_seed(1))
    torch.randn = counting
    try:
        run_ops.run_ops(x, ops)
    finally:
        torch.randn = randn
    assert sum(drawn) == sum(work.draw_counts(ops, tuple(start)))
    seeded = [op for op in ops if isinstance(op, (rewrite.Noise, growth_ops.Redraw))]
    assert len(work.draw_counts(ops, tuple(start))) == len(seeded)


def test_a_build_starts_its_longest_tensors_and_keeps_the_others_in_order(monkeypatch):
    from rewrite.transform import materialise

    monkeypatch.setattr(materialise, "workers", lambda: 2)
    costs = [5, 1, 1, 90, 1, 200, 3, 1]  # a worker's share is 151: longer than 151 / 8 are f and d
    assert materialise._longest_first(list("abcdefgh"), costs) == list("fdabcegh")
    assert materialise._longest_first(list("abc"), [1, 1, 1]) == list("abc")


@st.composite
def op_chains(draw):
    """A shape and a chain of ops on it: Takes (kept units first, or not), noise on some units, splits,
    scalings, now and then a redraw or a pass's end; rows of up to 40 values, so vector loops have tails."""
    from rewrite.transform.growth_ops import PassEnd, Redraw

    start = [draw(st.integers(1, 5)) for _ in range(draw(st.integers(0, 2)))] + [draw(st.integers(1, 40))]
    shape, ops, seed = list(start), [], draw(st.integers(0, 10**6))
    for k in range(draw(st.integers(1, 6))):
        axis = draw(st.integers(0, len(shape) - 1))
        kind = draw(st.sampled_from(["take", "take", "take", "noise", "split", "scale", "redraw", "end"]))
        n = shape[axis]
        if kind == "take":
            extra = draw(st.integers(0, 4))
            new = draw(st.lists(st.integers(-1, n - 1), min_size=extra, max_size=extra))
            kept = list(range(n)) if draw(st.integers(0, 4)) else draw(st.permutations(range(n)))
            ops.append(rewrite.Take(axis, torch.tensor(kept + new, dtype=torch.long), torch.arange(n), "copy"))
            shape[axis] = n + extra
        elif kind == "noise":
            positions = sorted(draw(st.sets(st.integers(0, n - 1), min_size=1)))
            ops.append(rewrite.Noise(axis, torch.tensor(positions), seed + k, 0.3))
        elif kind == "split":
            divisors = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
            ops.append(rewrite.Split(axis, torch.tensor(divisors)))
        elif kind == "scale":
            ops.append(rewrite.Scale(draw(st.sampled_from([0.0, 0.5, 3.0])), draw(st.sampled_from([0.0, 1.0])),
                                     axis, torch.arange(n) if draw(st.booleans()) else None))
        elif kind == "redraw":
            ops.append(Redraw(seed + k))
        else:
            ops.append(PassEnd(None))
    return start, ops


@st.composite
def take_then_take(draw):
    """The chain the leading slice is for: a Take, in-place ops (noise, a split, a scaling, or a zeroing that
    rules it out), a second Take that keeps every position first, maybe ops that change all of its result,
    then noise scaled by the tensor between the Takes (as it was before those ops)."""
    start = [draw(st.integers(1, 9)), draw(st.integers(1, 40))]
    shape, seed = list(start), draw(st.integers(0, 10**6))

    def take(axis):
        n, extra = shape[axis], draw(st.integers(1, 4))
        new = draw(st.lists(st.integers(-1, n - 1), min_size=extra, max_size=extra))
        shape[axis] = n + extra
        return rewrite.Take(axis, torch.tensor(list(range(n)) + new, dtype=torch.long), torch.arange(n), "copy")

    def in_place(axis):
        n = shape[axis]
        return draw(st.sampled_from([
            rewrite.Noise(axis, torch.arange(n - 1, n), seed, 0.3),
            rewrite.Noise(axis, torch.arange(n), seed + 2, 0.3),
            rewrite.Split(axis, torch.tensor(draw(st.lists(st.integers(1, 4), min_size=n, max_size=n)))),
            rewrite.Scale(0.5, 1.0, axis, torch.arange(n)),
            rewrite.Scale(0.0, 0.0, None, None)]))

    first = draw(st.integers(0, 1))
    ops = [take(first)]
    ops += [in_place(first) for _ in range(draw(st.integers(0, 2)))]
    second = draw(st.integers(0, 1))
    ops.append(take(second))
    after = draw(st.integers(0, 1))  # ops on the result that change its leading slice before the noise reads it
    ops += [in_place(after), rewrite.Scale(2.0, 0.0, None, None)][:draw(st.integers(0, 2))]
    ops.append(rewrite.Noise(second, torch.arange(shape[second]), seed + 1, 0.2))
    return start, ops


@settings(max_examples=150, deadline=None)
@given(st.one_of(op_chains(), take_then_take()), st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_property_a_take_written_into_the_next_takes_leading_slice_gives_the_bits_of_its_own_tensor(chain, dtype):
    """``run_ops`` writes a Take's result straight into the leading slice of a later Take's (kept units first,
    only in-place ops between): the bits of making each Take's tensor on its own, for any chain of ops."""
    from rewrite.transform import run_ops as growth_ops

    start, ops = chain
    x = torch.randn(start, generator=torch.Generator().manual_seed(2)).to(dtype)
    made = growth_ops.run_ops(x, ops)
    into = growth_ops._into_next_take
    growth_ops._into_next_take = lambda *args: (None, None)
    try:
        alone = growth_ops.run_ops(x, ops)
    finally:
        growth_ops._into_next_take = into
    assert made.dtype == alone.dtype and made.shape == alone.shape
    torch.testing.assert_close(made, alone, rtol=0, atol=0, equal_nan=True)
