"""Hugging Face models built from tiny configs with random weights (no download); their example inputs come
from ``rewrite.io.hf.example_inputs``."""

from __future__ import annotations

from rewrite.io.hf import TOKENS, example_inputs

__all__ = ["TOKENS", "example_inputs"]


def _quiet_config(cls, **fields):
    fields.setdefault("bos_token_id", 0)
    fields.setdefault("eos_token_id", 1)
    fields.setdefault("pad_token_id", 0)
    return cls(**fields)


def _with_inputs(model):
    model.eval()
    args, kwargs = example_inputs(model)
    return model, args, kwargs


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = _quiet_config(GPT2Config, n_layer=2, n_embd=32, n_head=4, vocab_size=96, n_positions=64)
    return _with_inputs(GPT2LMHeadModel(config))


# Shared by the decoder-only families: 4 query heads over 2 key-value heads (grouped-query attention).
DECODER = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=96,
    max_position_embeddings=64,
)


def _decoder(config_class, model_class, **fields):
    return _with_inputs(model_class(_quiet_config(config_class, **{**DECODER, **fields})))


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return _decoder(LlamaConfig, LlamaForCausalLM)


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _decoder(Qwen2Config, Qwen2ForCausalLM)


def bert():
    from transformers import BertConfig, BertModel

    fields = {k: v for k, v in DECODER.items() if k != "num_key_value_heads"}
    return _with_inputs(BertModel(_quiet_config(BertConfig, **{**fields, "intermediate_size": 64})))


def mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    # the default grouped experts have no ONNX conversion
    return _decoder(MixtralConfig, MixtralForCausalLM, num_local_experts=4, num_experts_per_tok=2,
                    experts_implementation="batched_mm")


# -- more families, each with a structure the zoo above does not have (see tests/test_families.py) ------
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=96)


def gemma():
    """Norms multiply by ``1 + w``; the embedding is scaled by ``sqrt(hidden)``; tied head."""
    from transformers import GemmaConfig, GemmaForCausalLM

    return _decoder(GemmaConfig, GemmaForCausalLM, head_dim=8)


def gemma2():
    """Sandwich norms (each branch ends in a norm); sliding and full attention alternate per layer."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return _decoder(Gemma2Config, Gemma2ForCausalLM, head_dim=8)


def opt():
    """Batch and tokens flattened between residual units; ReLU MLP sized by ``ffn_dim``."""
    from transformers import OPTConfig, OPTForCausalLM

    config = _quiet_config(OPTConfig, **SMALL, ffn_dim=48, max_position_embeddings=64, word_embed_proj_dim=32)
    return _with_inputs(OPTForCausalLM(config))


def phi3():
    """Fused ``qkv_proj`` and ``gate_up_proj`` split by slicing and ``chunk``."""
    from transformers import Phi3Config, Phi3ForCausalLM

    return _decoder(Phi3Config, Phi3ForCausalLM)


def falcon():
    """Parallel attention and MLP added in place; linears written ``x @ W.T``; ``head_dim`` derived."""
    from transformers import FalconConfig, FalconForCausalLM

    return _with_inputs(FalconForCausalLM(_quiet_config(FalconConfig, **SMALL)))


# -- families beyond the ten above, as users build them (the installed transformers' defaults: no implementation
# overrides), each from a tiny config: name -> (config class, model class, fields beyond DECODER or SMALL, what
# it adds). examples/bench_families.py runs every pass on each.
MORE = {
    "mistral": ("MistralConfig", "MistralForCausalLM", {"head_dim": 8}, "sliding-window attention"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}, "q/k RMSNorm per head"),
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2,
                                                            "moe_intermediate_size": 24}, "experts, default kernel"),
    "mixtral-default": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2},
                        "Mixtral with the default grouped experts"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, "norms after each branch, q/k norms over all heads"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2}, "experts, q/k norms"),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {"use_parallel_residual": True}, "parallel residual, LayerNorm"),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 4.0, "residual_multiplier": 0.5,
                                                        "embedding_multiplier": 2.0}, "scaled embeddings, branches, logits"),
    "cohere": ("CohereConfig", "CohereForCausalLM", {}, "x + attn + mlp in one sum, LayerNorm without bias"),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {}, "LayerNorm, GELU MLP with biases"),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {}, "RoPE skipped on some layers"),
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"use_parallel_residual": True},
                 "per-head interleaved q|k|v, partial rotary"),
    "phi": ("PhiConfig", "PhiForCausalLM", {}, "parallel block, partial rotary, dense output with bias"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8}, "q/k norms, sandwich norms, local/global"),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", {"n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4,
                                               "n_positions": 64}, "interleaved rotary (stack), parallel block"),
    "roberta": ("RobertaConfig", "RobertaModel", {"intermediate_size": 64, "max_position_embeddings": 70},
                "post-norm encoder, offset positions"),
    "distilbert": ("DistilBertConfig", "DistilBertModel", {"dim": 32, "hidden_dim": 64, "n_layers": 2, "n_heads": 4},
                   "MLP size called hidden_dim"),
    "modernbert": ("ModernBertConfig", "ModernBertModel", {"intermediate_size": 48, "global_attn_every_n_layers": 2,
                                                           "local_attention": 8}, "fused Wqkv unbound, GLU MLP"),
    "deepseek-v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                     "first_k_dense_replace": 1, "n_shared_experts": 1, "kv_lora_rank": 16, "q_lora_rank": 16,
                     "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, "n_group": 1, "topk_group": 1,
                     "num_key_value_heads": 4},
                    "latent attention (q/k and v head sizes apart), a dense first layer, shared experts"),
    "t5": ("T5Config", "T5Model", {"d_model": 32, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4,
                                   "d_kv": 8, "decoder_start_token_id": 0},
           "encoder-decoder, relative position bias, cross-attention mask built with zeros"),
    "whisper": ("WhisperConfig", "WhisperModel", {"d_model": 32, "encoder_ffn_dim": 64, "decoder_ffn_dim": 48,
                                                  "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
                                                  "decoder_attention_heads": 4, "num_mel_bins": 8,
                                                  "max_source_positions": 16, "max_target_positions": 32,
                                                  "decoder_start_token_id": 0},
                "audio encoder-decoder, MLP sizes per side (encoder_ffn_dim, decoder_ffn_dim)"),
}
_NOT_DECODER = {"gptj", "distilbert", "t5", "whisper"}  # their configs name the sizes differently: only their own fields
_ENCODERS = {"roberta", "modernbert"}


def more(name: str):
    import transformers

    config_class, model_class, fields, _ = MORE[name]
    config_class, model_class = getattr(transformers, config_class), getattr(transformers, model_class)
    if name in _NOT_DECODER:
        base = {"vocab_size": 96}
    elif name in _ENCODERS:
        base = {**SMALL}
    else:
        base = {**DECODER}
    return _with_inputs(model_class(_quiet_config(config_class, **{**base, **fields})))
