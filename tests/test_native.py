"""rewrite.to_native: a grown Hugging Face model back in its own class, and its save/load round trip."""

import pytest
import torch
from conftest import traced

import passes
import rewrite
from rewrite import NotRepresentableError, to_native

ROUND_TRIPS = {
    "hf-llama": ([passes.widen_mlp(factor=2), passes.add_heads(4), passes.widen_hidden(factor=2),
                  passes.add_layers(2), passes.split_layers(2, layers=[0])],
                 dict(num_hidden_layers=5, hidden_size=64, num_attention_heads=8, num_key_value_heads=4,
                      head_dim=8, intermediate_size=96, rms_norm_eps=1e-6 / 2)),
    "hf-qwen2": ([passes.add_layers(1, at=0), passes.widen_hidden(factor=2), passes.add_heads(4)],
                 dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=8, num_key_value_heads=4,
                      layer_types=["full_attention"] * 3)),
    "hf-gpt2": ([passes.widen_mlp(factor=2), passes.add_heads(4), passes.add_layers(1),
                 passes.widen_hidden(factor=2, init="clone")],
                dict(n_layer=3, n_embd=64, n_head=8, n_inner=256)),
    "hf-bert": ([passes.widen_mlp(factor=2), passes.split_layers(2, layers=[1])],
                dict(num_hidden_layers=3, intermediate_size=128)),
    "hf-mixtral": ([passes.add_layers(1), passes.widen_hidden(factor=2), passes.add_heads(4)],
                   dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=8, num_key_value_heads=4)),
}


def _main_output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_native_model_computes_the_grown_function_and_round_trips(name, tmp_path):
    plan, expected = ROUND_TRIPS[name]
    built, graph = traced(name)
    grown = rewrite.apply(graph, plan, built.args, built.kwargs)
    native = to_native(grown, like=built.model)
    assert type(native) is type(built.model)
    for field, value in expected.items():
        assert getattr(native.config, field) == pytest.approx(value) if isinstance(value, float) else \
            getattr(native.config, field) == value, field
    assert sum(p.numel() for p in native.parameters()) == grown.graph.num_parameters
    native.save_pretrained(tmp_path)
    loaded = type(built.model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        reference = _main_output(grown.module(*built.args, **built.kwargs))
        torch.testing.assert_close(_main_output(native(*built.args, **built.kwargs)), reference, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(_main_output(loaded(*built.args, **built.kwargs)), reference, rtol=1e-5, atol=1e-6)


def test_tied_embeddings_stay_tied():
    from transformers import LlamaConfig, LlamaForCausalLM

    from rewrite.app.zoo.huggingface import DECODER

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**DECODER, tie_word_embeddings=True)).eval()
    ids = torch.randint(0, 96, (2, 8))
    grown = rewrite.apply(model, [passes.widen_hidden(factor=2), passes.add_heads(4), passes.add_layers(1)], (ids,))
    native = to_native(grown, like=model)
    assert native.config.tie_word_embeddings and native.lm_head.weight is native.model.embed_tokens.weight
    torch.testing.assert_close(native(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_what_the_class_cannot_express_is_refused_with_the_reason():
    built, graph = traced("hf-llama")
    grown = rewrite.apply(graph, [passes.upcycle_moe(2, 1)], built.args, built.kwargs)
    with pytest.raises(NotRepresentableError, match="grown tensors have no place in LlamaForCausalLM.*router"):
        to_native(grown, like=built.model)
    grown = rewrite.apply(graph, [passes.widen_hidden(factor=2), passes.add_heads(2)], built.args, built.kwargs)
    with pytest.raises(NotRepresentableError, match=r"LlamaConfig rejects the grown sizes: .*hidden size \(64\) is not "
                                                    r"a multiple of the number of attention heads \(6\)"):
        to_native(grown, like=built.model)
    built, graph = traced("hf-bert")
    grown = rewrite.apply(graph, [passes.add_heads(1)], built.args, built.kwargs)
    with pytest.raises(NotRepresentableError, match="5 heads of size 8 do not fill the hidden size 32"):
        to_native(grown, like=built.model)
    assert grown.module(*built.args).last_hidden_state.shape == (2, 8, 32)  # the graph form stays usable
    built, graph = traced("gpt")
    with pytest.raises(NotRepresentableError, match="GPT is not a Hugging Face model"):
        to_native(rewrite.apply(graph, [passes.add_layers(1)], built.args), like=built.model)


def test_the_user_s_dtype_is_kept_by_the_native_class():
    """A bfloat16 model grows in bfloat16 and comes back in bfloat16 (config included), not as float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=50,
                                         num_attention_heads=4, num_key_value_heads=2)).to(torch.bfloat16).eval()
    ids = torch.randint(0, 50, (2, 5))
    grown = rewrite.apply(model, [passes.widen_mlp(factor=2), passes.add_layers(1)], ids)
    assert grown.report.exact and {p.dtype for p in grown.module.parameters()} == {torch.bfloat16}
    native = rewrite.to_native(grown, like=model)
    assert {p.dtype for p in native.parameters()} == {torch.bfloat16} and native.config.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(native(ids).logits, model(ids).logits)  # zero columns: exact in bfloat16 too


def test_distilbert_s_mlp_size_goes_to_hidden_dim():
    from transformers import DistilBertConfig, DistilBertModel

    model = DistilBertModel(DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, vocab_size=50)).eval()
    ids = torch.randint(0, 50, (2, 5))
    native = rewrite.to_native(rewrite.apply(model, [passes.widen_mlp(factor=2)], ids), like=model)
    assert native.config.hidden_dim == 128 and native.transformer.layer[0].ffn.lin1.out_features == 128
    with torch.no_grad():
        torch.testing.assert_close(native(ids).last_hidden_state, model(ids).last_hidden_state)


def test_constructor_flags_outside_the_config_round_trip():
    """``BertModel(config, add_pooling_layer=False)`` has no pooler; the native model is built the same way."""
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 vocab_size=50), add_pooling_layer=False).eval()
    ids = torch.randint(0, 50, (2, 5))
    native = rewrite.to_native(rewrite.apply(model, [passes.widen_mlp(factor=2)], ids), like=model)
    assert native.pooler is None and native.config.intermediate_size == 128
    with torch.no_grad():
        torch.testing.assert_close(native(ids).last_hidden_state, model(ids).last_hidden_state)
