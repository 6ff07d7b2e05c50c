"""Property: random transformer configurations and random sequences of width and depth passes.

For every drawn plan: a plan claimed exact verifies (``apply`` raises ``VerificationError`` otherwise), a
refused plan says why in a ``GrowthError``, and the input model is bit-identical afterwards.
"""

import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import passes
import rewrite
from rewrite.app.zoo.handwritten import GPT, Llama


@st.composite
def models(draw):
    kind = draw(st.sampled_from(["llama", "gpt"]))
    head = draw(st.sampled_from([4, 8]))
    kv = draw(st.integers(1, 2))
    heads = kv * draw(st.sampled_from([1, 2, 2]))  # grouped-query attention in most drawn Llamas
    dim = heads * head
    hidden = draw(st.integers(8, 40))
    layers = draw(st.integers(1, 2))
    torch.manual_seed(draw(st.integers(0, 1000)))
    if kind == "llama":
        model = Llama(vocab=32, dim=dim, heads=heads, kv_heads=kv, hidden=hidden, layers=layers)
    else:
        model = GPT(vocab=32, dim=dim, heads=heads, hidden=hidden, layers=layers)
    return kind, model.eval(), (heads // kv if kind == "llama" else 1)


@st.composite
def steps(draw, ratio):
    choices = []
    for _ in range(draw(st.integers(1, 3))):
        which = draw(st.sampled_from(["mlp", "heads", "value", "hidden", "layers", "split", "moe"]))
        init = draw(st.sampled_from(["zero", "clone", "net2net"]))
        if which == "mlp":
            choices.append(passes.widen_mlp(factor=draw(st.sampled_from([1.5, 2])), init=init))
        elif which == "heads":
            choices.append(passes.add_heads(ratio * draw(st.integers(1, 2)), init=init))
        elif which == "value":
            choices.append(passes.widen_heads(v=draw(st.integers(9, 12)), init=init))
        elif which == "hidden":
            choices.append(passes.widen_hidden(factor=2, init=init))
        elif which == "layers":
            at = draw(st.sampled_from([None, 0]))
            choices.append(passes.add_layers(draw(st.integers(1, 2)), at=at, init=draw(st.sampled_from(["zero", "copy"]))))
        elif which == "split":
            choices.append(passes.split_layers(draw(st.integers(2, 3)), layers=[0]))
        else:
            choices.append(passes.upcycle_moe(draw(st.integers(2, 3)), top_k=draw(st.integers(1, 2))))
    return choices


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models(), st.data())
def test_property_exact_plans_verify_and_refusals_say_why(drawn, data):
    kind, model, ratio = drawn
    plan = data.draw(steps(ratio))
    ids = torch.randint(0, 32, (2, 6))
    before = copy.deepcopy(model.state_dict())
    try:
        grown = rewrite.apply(model, plan, (ids,))
    except rewrite.GrowthError as refusal:  # NotExactError included: a reason, never a silent wrong model
        assert str(refusal).strip()
    else:
        exact_so_far = True  # after an approximate pass, the error against the original is that pass's
        for record in grown.report.passes:  # (apply checks later exact passes against their own input)
            if record.plan is None:
                continue
            if record.exact and exact_so_far:
                assert record.verification.max_rel_error <= 1e-5
            elif not record.exact:  # split_layers: labelled approximate, with the reason and the measured error
                assert "residual splitting" in record.plan.reason and record.verification is not None
                exact_so_far = False
        assert grown.module(ids).shape == model(ids).shape
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
