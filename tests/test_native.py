"""rewrite.to_native: a grown Hugging Face model back in its own class, and its save/load round trip."""

import copy

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
    built, graph = traced("hf-gpt2")
    grown = rewrite.apply(graph, [passes.upcycle_moe(2, 1)], built.args, built.kwargs)
    with pytest.raises(NotRepresentableError, match="GPT2LMHeadModel has no mixture-of-experts class growfx writes "
                                                    "to.*keep the graph form"):
        to_native(grown, like=built.model)
    built, graph = traced("hf-llama")
    grown = rewrite.apply(graph, [passes.upcycle_moe(2, 1, layers=[1])], built.args, built.kwargs)
    with pytest.raises(NotRepresentableError, match=r"MixtralForCausalLM has experts in every layer, but layers \[0\] "
                                                    r"stay dense"):
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


def test_a_division_bfloat16_cannot_hold_is_computed_in_float32_and_reported():
    """widen_hidden(factor=3, clone) divides outgoing weights by 3: in bfloat16 that rounds. The grown weights
    are float32 results rounded once (not a bfloat16 reciprocal times a weight, rounded twice), the report
    says the exact plan holds only to bfloat16's precision, and factor 2 (a power of two) says nothing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, vocab_size=50,
                                         num_attention_heads=4, num_key_value_heads=2)).to(torch.bfloat16).eval()
    ids = torch.randint(0, 50, (2, 5))
    grown = rewrite.apply(model, [passes.widen_hidden(factor=3, init="clone")], ids)
    record = grown.report.passes[0]
    assert record.exact and len(record.notes) == 1
    assert "multiplied by 0.3333, which bfloat16 rounds (relative error up to 0.0039" in record.notes[0]
    assert "note: exact in real arithmetic" in str(grown.report)
    old = model.model.layers[0].self_attn.q_proj.weight
    new = dict(grown.module.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    assert new.dtype == torch.bfloat16
    torch.testing.assert_close(new[:, :32], (old.float() / 3).to(torch.bfloat16), rtol=0, atol=0)
    assert not torch.equal(new[:, :32], old * torch.tensor(1 / 3, dtype=torch.bfloat16))  # double rounding differs
    assert not rewrite.apply(model, [passes.widen_hidden(factor=2, init="clone")], ids).report.passes[0].notes


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


UPCYCLED = {  # dense family -> (mixture class, plan's layers, dense layers the class keeps)
    "llama": ("MixtralForCausalLM", None, None),
    "mistral": ("MixtralForCausalLM", None, None),
    "qwen2": ("Qwen2MoeForCausalLM", [1], [0]),
    "qwen3": ("Qwen3MoeForCausalLM", None, []),
}


@pytest.mark.parametrize("family", list(UPCYCLED))
def test_an_upcycled_model_becomes_its_family_s_mixture_class(family, tmp_path):
    """upcycle_moe -> Mixtral / Qwen2-MoE / Qwen3-MoE: sparse dispatch, the same router (softmax, top-k,
    renormalised), and the upcycled function, also after the experts and router have moved apart (as training
    would move them), so that routing decides the output; the saved folder loads through the Auto class."""
    from transformers import AutoModelForCausalLM

    from rewrite.app.zoo import huggingface

    expected, layers, dense = UPCYCLED[family]
    model, args, kwargs = getattr(huggingface, family)() if hasattr(huggingface, family) else huggingface.more(family)
    grown = rewrite.apply(model, [passes.upcycle_moe(4, 2, layers=layers)], args, kwargs)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in grown.module.named_parameters():
            if ".experts." in name or ".router." in name:
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.05)
    native = to_native(grown, like=model)
    assert type(native).__name__ == expected
    assert native.config.num_experts_per_tok == 2 and getattr(native.config, "norm_topk_prob", True) is True
    if dense is not None:
        assert native.config.mlp_only_layers == dense
    assert type(native.model.layers[1].mlp).__name__.endswith("SparseMoeBlock")
    native.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(native)
    with torch.no_grad():
        reference = grown.module(*args, **kwargs).logits
        assert (reference - model(*args, **kwargs).logits).abs().max() > 1e-3  # the experts differ now
        torch.testing.assert_close(native(*args, **kwargs).logits, reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(*args, **kwargs).logits, reference, rtol=1e-5, atol=1e-5)


def test_mixture_configs_size_dense_layers_experts_and_their_layer_lists_apart():
    """In a mixture the config sizes dense layers and experts under different names (Qwen3-MoE:
    intermediate_size for mlp_only_layers, moe_intermediate_size for experts; Llama4: intermediate_size_mlp for
    dense layers, intermediate_size for experts), lists its dense layers by index (renumbered when a copied dense
    layer is inserted in front), and runs its experts with transformers' default kernel (grouped products)."""
    import transformers

    from rewrite.app.zoo.huggingface import DECODER, _quiet_config

    cases = [
        ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
         dict(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, mlp_only_layers=[0],
              num_hidden_layers=3),
         [passes.add_layers(1, at=0, init="copy"), passes.widen_mlp(factor=2)],
         dict(mlp_only_layers=[0, 1], intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=4)),
        ("Llama4TextConfig", "Llama4ForCausalLM",
         dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=40, interleave_moe_layer_step=2,
              head_dim=8),
         [passes.widen_mlp(factor=2)], dict(intermediate_size_mlp=80, intermediate_size=96)),
        ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2),
         [passes.widen_mlp(factor=3)], dict(intermediate_size=144)),
    ]
    for config_class, model_class, fields, plan, expected in cases:
        torch.manual_seed(0)
        config = _quiet_config(getattr(transformers, config_class), **{**DECODER, **fields})
        model = getattr(transformers, model_class)(config).eval()
        ids, fresh = torch.randint(0, 96, (2, 6)), torch.randint(0, 96, (3, 9))
        grown = rewrite.apply(model, plan, (ids,))
        assert grown.report.exact, model_class
        native = to_native(grown, like=model)
        for field, value in expected.items():
            assert getattr(native.config, field) == value, (model_class, field)
        with torch.no_grad():
            torch.testing.assert_close(native(fresh).logits, model(fresh).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, plan, expected", [
    ("hf-t5", [passes.widen_mlp(factor=2), passes.add_heads(2)], dict(d_ff=128, num_heads=6, num_layers=2)),
    ("hf-whisper", [passes.widen_mlp(factor=2), passes.add_layers(1)],
     dict(encoder_ffn_dim=128, decoder_ffn_dim=96, encoder_layers=3, decoder_layers=2)),
])
def test_encoder_decoders_size_each_side_apart(name, plan, expected):
    """T5 and Whisper as users build them: example inputs with decoder ids (and Whisper's log-mel features), a
    layer count per stack (num_layers / num_decoder_layers, encoder_layers / decoder_layers), Whisper's MLP sizes
    per side, and T5's cross-attention bias, built with zeros(1, heads, q, k), grown with the heads."""
    from rewrite.app import zoo
    from rewrite.io.hf import example_inputs

    built = zoo.build(name)
    grown = rewrite.apply(built.model, plan, built.args, built.kwargs)
    assert grown.report.exact
    native = to_native(grown, like=built.model)
    for field, value in expected.items():
        assert getattr(native.config, field) == value, field
    args, kwargs = example_inputs(built.model, batch=3, length=11)
    with torch.no_grad():
        torch.testing.assert_close(native(*args, **kwargs).last_hidden_state,
                                   built.model(*args, **kwargs).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_deepseek_v3_dense_prefix_and_latent_attention_go_back_to_their_fields():
    """DeepSeek-V3: a dense first layer (first_k_dense_replace) before mixtures with a shared expert, and latent
    attention whose q/k and v head sizes differ by design. A copy of the dense layer inserted in front keeps
    the dense layers a prefix (first_k_dense_replace 1 -> 2); the MLP widths go to intermediate_size and
    moe_intermediate_size; the head sizes stay their own fields."""
    from rewrite.app import zoo

    built = zoo.build("hf-deepseek-v3")
    ids = torch.randint(0, 96, (3, 11))
    grown = rewrite.apply(built.model, [passes.add_layers(1, at=0, init="copy"), passes.widen_mlp(factor=2)],
                          built.args)
    native = to_native(grown, like=built.model)
    assert (native.config.first_k_dense_replace, native.config.num_hidden_layers) == (2, 3)
    assert (native.config.intermediate_size, native.config.moe_intermediate_size) == (96, 48)
    assert native.config.v_head_dim == 8 and native.config.qk_nope_head_dim == 8
    with torch.no_grad():
        torch.testing.assert_close(native(ids).logits, built.model(ids).logits, rtol=1e-5, atol=1e-5)
    grown = rewrite.apply(built.model, [passes.add_layers(1, at=1, init="copy"), passes.add_layers(1, at=0)],
                          built.args)
    native = to_native(grown, like=built.model)
    assert (native.config.first_k_dense_replace, native.config.num_hidden_layers) == (2, 4)
    assert [type(layer.mlp).__name__ for layer in native.model.layers] == [
        "DeepseekV3MLP", "DeepseekV3MLP", "DeepseekV3MoE", "DeepseekV3MoE"]


@pytest.mark.parametrize("name", ["hf-llama", "hf-gpt2"])
def test_the_native_model_holds_the_grown_tensors_and_writing_it_in_another_dtype_leaves_them(name, tmp_path):
    """No second copy of the grown model: the native class is built on meta and takes the grown tensors
    themselves (a tied head tied again); writing it as bfloat16 converts copies, not the shared tensors."""
    from rewrite.io.sources import save_huggingface

    built, graph = traced(name)
    grown = rewrite.apply(graph, [passes.widen_mlp(factor=2), passes.add_layers(1)], built.args, built.kwargs)
    native = to_native(grown, like=built.model)
    held = {t.data_ptr() for t in grown.module.state_dict().values()}
    assert all(t.data_ptr() in held for t in native.state_dict().values())
    assert not any(t.is_meta for t in native.parameters())
    head, embeddings = native.get_output_embeddings(), native.get_input_embeddings()
    assert (head.weight is embeddings.weight) == built.model.config.tie_word_embeddings
    save_huggingface(native, tmp_path / "bf16", dtype=torch.bfloat16)
    assert all(t.dtype == torch.float32 for t in grown.module.parameters())
    reloaded = type(built.model).from_pretrained(tmp_path / "bf16")
    assert reloaded.dtype == torch.bfloat16
    for key, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, grown.module.state_dict()[key].to(torch.bfloat16)), key


@pytest.mark.parametrize("name", ["hf-llama", "hf-gpt2", "hf-bert", "hf-mixtral"])
def test_parameters_on_meta_builds_the_class_s_buffers_and_ties_without_initialising_parameters(name, monkeypatch):
    """The same parameter names, shapes, ties and computed buffers as a plain build; Hugging Face's init functions
    never run on the meta parameters, and no parameter keeps the mark that skips them."""
    import transformers.initialization as hf_init

    from rewrite.io.native import parameters_on_meta

    built, _ = traced(name)
    cls, config = type(built.model), copy.deepcopy(built.model.config)
    if name == "hf-llama":
        config.tie_word_embeddings = True
    plain = cls(config)
    initialised = []
    for function in ("normal_", "zeros_", "ones_", "uniform_", "constant_"):
        real = hf_init.TORCH_INIT_FUNCTIONS[function]
        monkeypatch.setitem(hf_init.TORCH_INIT_FUNCTIONS, function,
                            lambda tensor, *a, _real=real, **k: (initialised.append(tensor), _real(tensor, *a, **k))[1])
    with parameters_on_meta():
        empty = cls(config)

    def ties(module):
        names = {}
        for n, p in module.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(n)
        return sorted(v for v in names.values() if len(v) > 1)

    assert [(n, p.shape) for n, p in empty.named_parameters()] == [(n, p.shape) for n, p in plain.named_parameters()]
    assert all(p.is_meta for p in empty.parameters())
    assert ties(empty) == ties(plain)
    assert bool(ties(plain)) == (name in ("hf-llama", "hf-gpt2"))
    buffers = dict(plain.named_buffers())
    assert buffers.keys() == dict(empty.named_buffers()).keys()
    for n, b in empty.named_buffers():
        torch.testing.assert_close(b, buffers[n], rtol=0, atol=0, msg=n)
    assert not any(t.is_meta for t in initialised)
    assert not any(hasattr(p, "_is_hf_initialized") for p in empty.parameters())
