"""Growing a sharded Hugging Face checkpoint on the meta device, one tensor at a time (``--stream``)."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import passes
import rewrite
from rewrite.app.cli import main
from rewrite.io.grow_checkpoint import grow_checkpoint
from rewrite.io.safetensors_stream import INDEX, CheckpointReader, write_safetensors

PLAN = ["widen_mlp:factor=3,init=clone", "add_layers:n=1,at=[0,2],init=copy", "widen_hidden:factor=2,init=clone"]


def _llama(dtype, tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, tie_word_embeddings=tied)
    return LlamaForCausalLM(config).to(dtype).eval()


BENCHMARK_PLAN = ["widen_mlp:factor=2", "add_layers:n=2"]  # noise, then fresh draws at the noised std


@pytest.mark.parametrize("dtype, tied, plan", [(torch.bfloat16, True, PLAN), (torch.float32, False, PLAN),
                                               (torch.bfloat16, False, BENCHMARK_PLAN)])
def test_streamed_folder_equals_the_in_memory_growth_bit_for_bit(tmp_path, capsys, dtype, tied, plan):
    """The same plan through both paths: ``growfx grow --stream`` (meta plan, shard by shard) and ``growfx grow``
    (load in float32, grow, write in the stored dtype) give the same tensors, config and dtype; the streamed
    folder is sharded with an index and keeps the source's other files."""
    from transformers import AutoModelForCausalLM

    model = _llama(dtype, tied)
    source = tmp_path / "source"
    model.save_pretrained(source, max_shard_size="20KB")
    assert (source / INDEX).is_file()
    arguments = [argument for spec in plan for argument in ("--pass", spec)]
    assert main(["grow", str(source), "--stream", "--out", str(tmp_path / "streamed"), *arguments]) == 0
    assert "wrote " + str(tmp_path / "streamed") + ": LlamaForCausalLM, " in (out := capsys.readouterr().out)
    assert " copied unchanged from the source files)" in out
    assert main(["grow", str(source), "--out", str(tmp_path / "in-memory"), *arguments]) == 0
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").eval()
    in_memory = AutoModelForCausalLM.from_pretrained(tmp_path / "in-memory").eval()
    assert streamed.dtype == dtype and streamed.config.num_hidden_layers == 5
    assert (streamed.config.hidden_size, streamed.config.intermediate_size) == ((64, 144) if plan is PLAN else (32, 96))
    assert streamed.config.tie_word_embeddings == tied
    a, b = streamed.state_dict(), in_memory.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "streamed" / "generation_config.json").is_file()
    ids = torch.randint(0, 64, (3, 9))
    with torch.no_grad():
        error = (streamed(ids).logits.float() - model(ids).logits.float()).abs().max()
    assert error < (2e-2 if dtype == torch.bfloat16 else 1e-4)


def test_streaming_writes_shards_one_tensor_at_a_time_within_the_shard_size(tmp_path):
    model = _llama(torch.float32, True)
    model.save_pretrained(tmp_path / "source")
    written = grow_checkpoint(tmp_path / "source", [passes.widen_mlp(factor=2), passes.add_layers(2)],
                              tmp_path / "out", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "out" / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert written.shards == len(files) > 1
    reader = CheckpointReader(tmp_path / "out")
    sizes = {file: sum(reader.nbytes(n) for n, f in index["weight_map"].items() if f == file) for file in files}
    largest = max(reader.nbytes(n) for n in reader.keys())
    assert all(size <= max(40_000, largest) for size in sizes.values())
    assert index["metadata"]["total_size"] == sum(reader.nbytes(n) for n in reader.keys())
    assert "model.embed_tokens.weight" in reader and "lm_head.weight" not in reader  # tied: saved once
    assert written.grown.report.exact and not written.grown.report.passes[0].verification  # planned, not run


def _qwen2(dtype, tied=False):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, tie_word_embeddings=tied)
    return Qwen2ForCausalLM(config).to(dtype).eval()


@pytest.mark.parametrize("family, dtype, plan, mixture", [
    (_llama, torch.bfloat16, ["upcycle_moe:experts=4,top_k=2"], "MixtralForCausalLM"),
    (_qwen2, torch.float32, ["widen_mlp:factor=2", "upcycle_moe:experts=3,top_k=2,layers=[0,2]"],
     "Qwen2MoeForCausalLM"),  # dense layer 1 listed in mlp_only_layers; a zero-width shared expert
])
def test_an_upcycled_model_streams_into_its_mixture_class_bit_for_bit(tmp_path, capsys, family, dtype, plan, mixture):
    """Streamed, the mixture's stacked experts are made expert by expert from the growth map (each the dense
    MLP's copy, gate and up concatenated): the same files as growing in memory, which also checks the mixture
    class against the grown graph by running both."""
    from transformers import AutoModelForCausalLM

    model = family(dtype, tied=False)
    source = tmp_path / "source"
    model.save_pretrained(source, max_shard_size="20KB")
    arguments = [argument for spec in plan for argument in ("--pass", spec)]
    assert main(["grow", str(source), "--stream", "--out", str(tmp_path / "streamed"), *arguments]) == 0
    assert f"wrote {tmp_path / 'streamed'}: {mixture}, " in capsys.readouterr().out
    assert main(["grow", str(source), "--out", str(tmp_path / "in-memory"), *arguments]) == 0
    stored = set(CheckpointReader(tmp_path / "streamed"))  # each expert apart, as save_pretrained stores them
    assert stored == set(CheckpointReader(tmp_path / "in-memory")) and not any("gate_up_proj" in k for k in stored)
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").eval()
    in_memory = AutoModelForCausalLM.from_pretrained(tmp_path / "in-memory").eval()
    assert type(streamed).__name__ == mixture and streamed.dtype == dtype
    config = lambda m: {k: v for k, v in m.config.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert config(streamed) == config(in_memory)
    a, b = streamed.state_dict(), in_memory.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 64, (3, 9))
    with torch.no_grad():
        error = (streamed(ids).logits.float() - model(ids).logits.float()).abs().max()
    assert error < (2e-2 if dtype == torch.bfloat16 else 1e-4)


def test_a_folder_storing_tensors_under_other_names_than_the_model_s_streams_bit_for_bit(tmp_path, capsys):
    """GPT-NeoX stores its output head as ``embed_out`` and transformers loads it as ``lm_head``: streaming reads
    the stored names as the model's, as loading does (``stored_keys.open_checkpoint``), gives the tensors of
    growing in memory, and stores them under the names ``save_pretrained`` does (``stored_keys.StoredLayout``)."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, vocab_size=64, tie_word_embeddings=False)).eval()
    source = tmp_path / "source"
    model.save_pretrained(source)
    assert "embed_out.weight" in CheckpointReader(source) and "lm_head.weight" not in CheckpointReader(source)
    arguments = ["--pass", "widen_mlp:factor=2", "--pass", "add_layers:n=1,init=copy"]
    assert main(["grow", str(source), "--stream", "--out", str(tmp_path / "streamed"), *arguments]) == 0
    assert main(["grow", str(source), "--out", str(tmp_path / "in-memory"), *arguments]) == 0
    capsys.readouterr()
    stored = set(CheckpointReader(tmp_path / "streamed"))  # under the names save_pretrained writes
    assert stored == set(CheckpointReader(tmp_path / "in-memory")) and "embed_out.weight" in stored
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").eval()
    in_memory = AutoModelForCausalLM.from_pretrained(tmp_path / "in-memory").eval()
    a, b = streamed.state_dict(), in_memory.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert streamed.config.num_hidden_layers == 3 and streamed.config.intermediate_size == 128
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(streamed(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1, num_local_experts=11,
                                            vocab_size=64))


def _qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM(Qwen2MoeConfig(hidden_size=16, intermediate_size=32, moe_intermediate_size=24,
                                              shared_expert_intermediate_size=40, num_hidden_layers=2,
                                              num_attention_heads=2, num_key_value_heads=1, num_experts=3,
                                              num_experts_per_tok=2, vocab_size=64))


@pytest.mark.parametrize("family, expert_key", [(_mixtral, "model.layers.1.block_sparse_moe.experts.10.w3.weight"),
                                                (_qwen2_moe, "model.layers.1.mlp.experts.2.up_proj.weight")])
def test_a_folder_storing_each_expert_apart_streams_into_one_stored_the_same_way_bit_for_bit(tmp_path, capsys,
                                                                                           family, expert_key):
    """Mixtral and Qwen2-MoE folders store each expert's matrices apart; transformers stacks them as it loads
    (its converters) and splits them again as it saves. Streaming reads the stacked tensors through the same
    converters and writes them split again: the streamed folder holds the same keys, tensors and shards'
    contents as ``save_pretrained`` of the in-memory growth, and loads as the grown model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = family().to(torch.bfloat16).eval()
    source = tmp_path / "source"
    model.save_pretrained(source, max_shard_size="8KB")
    assert expert_key.replace("layers.1", "layers.0") in CheckpointReader(source)
    arguments = ["--pass", "widen_mlp:factor=2", "--pass", "add_layers:n=1,init=copy"]
    assert main(["grow", str(source), "--out", str(tmp_path / "in-memory"), *arguments]) == 0
    grown = grow_checkpoint(source, [passes.widen_mlp(factor=2), passes.add_layers(1, init="copy")],
                            tmp_path / "streamed", max_shard_bytes=8 << 10)
    capsys.readouterr()
    streamed, in_memory = CheckpointReader(tmp_path / "streamed"), CheckpointReader(tmp_path / "in-memory")
    # unchanged attention tensors are copied as they are; every expert's matrix is made, then split again
    assert grown.shards > 2 and 0 < grown.copied <= sum(".experts." not in key for key in streamed)
    assert set(streamed) == set(in_memory) and expert_key in streamed
    assert all(torch.equal(streamed[key], in_memory[key]) for key in streamed)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").eval()
    assert loaded.config.num_hidden_layers == 3 and loaded.dtype == torch.bfloat16
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(tmp_path / "in-memory").eval()(ids).logits
        torch.testing.assert_close(loaded(ids).logits, reference, rtol=0, atol=0)


def test_experts_a_depth_growth_keeps_are_copied_part_by_part_as_stored(tmp_path, capsys):
    """LLaMA-Pro on a per-expert Mixtral: the copied layers' experts are the source's, unchanged. Their stored
    parts (each expert's ``w1``, ``w3``; ``w2`` too where not zeroed) are copied from the source files, renamed
    to the new layer, instead of stacked and split again: only each new layer's zeroed ``o_proj`` and ``w2`` are
    made. The folder equals the in-memory growth bit for bit."""
    torch.manual_seed(0)
    _mixtral().to(torch.bfloat16).save_pretrained(tmp_path / "source", max_shard_size="8KB")
    grown = grow_checkpoint(tmp_path / "source", [passes.add_layers(1, at=[0, 1], init="copy")], tmp_path / "streamed",
                            max_shard_bytes=8 << 10)
    assert main(["grow", str(tmp_path / "source"), "--out", str(tmp_path / "in-memory"),
                 "--pass", "add_layers:n=1,at=[0,1],init=copy"]) == 0
    capsys.readouterr()
    streamed, in_memory = CheckpointReader(tmp_path / "streamed"), CheckpointReader(tmp_path / "in-memory")
    assert set(streamed) == set(in_memory) and all(torch.equal(streamed[key], in_memory[key]) for key in streamed)
    assert grown.tensors == len(set(streamed)) and grown.tensors - grown.copied == 2 * (1 + 11)


def _hrm_text():
    from transformers import HrmTextConfig, HrmTextForCausalLM

    return HrmTextForCausalLM(HrmTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, head_dim=8, num_layers_per_stack=2))


def _gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, vocab_size=64, tie_word_embeddings=False))


@pytest.mark.parametrize("family, stored_key, model_key", [
    (_mixtral, "model.layers.1.block_sparse_moe.experts.10.w1.weight", "model.layers.1.mlp.experts.gate_up_proj"),
    (_hrm_text, "model.L_module.layers.1.attn.gqkv_proj.weight", "model.L_module.layers.1.self_attn.v_proj.weight"),
    (_gpt_neox, "embed_out.weight", "lm_head.weight"),
])
def test_a_folder_reads_as_the_model_s_tensors_and_writes_back_as_stored(tmp_path, family, stored_key, model_key):
    """``stored_keys`` against transformers' own save and load, for each kind of key mapping: Mixtral stacks
    per-expert parts into one tensor, HrmText splits one stored fused projection (q, k, v and a gate) into four
    tensors, GPT-NeoX renames its head. Read through ``open_checkpoint``, a ``save_pretrained`` folder is the
    model's state dict bit for bit; made back through ``StoredLayout``, it is the folder's keys and bytes."""
    from rewrite.io.grow_checkpoint import meta_model
    from rewrite.io.stored_keys import StoredLayout, open_checkpoint

    torch.manual_seed(0)
    model = family().eval()
    model.save_pretrained(tmp_path)
    stored, state = CheckpointReader(tmp_path), model.state_dict()
    assert stored_key in stored and model_key not in stored
    meta = meta_model(model.config)
    read = open_checkpoint(meta, tmp_path)
    held = [name for name in state if name in read]
    assert model_key in held and set(state) - set(held) <= {"lm_head.weight"}  # a tied head is not stored
    assert all(torch.equal(read[name], state[name]) for name in held)
    layout = StoredLayout(meta, [(name, tuple(state[name].shape), state[name].dtype) for name in held])
    assert {key for key, _, _ in layout.entries} == set(stored)
    assert all(torch.equal(layout.make(key, read.__getitem__), stored[key]) for key, _, _ in layout.entries)


@pytest.mark.parametrize("dropped, message", [
    ("experts.2.w1.", r"transformers' converter cannot make model\.layers\.0\.mlp\.experts\.gate_up_proj of the 5 "
                      r"stored tensors .*experts\.0\.w1\.weight \.\. .*experts\.2\.w3\.weight: Sizes of tensors"),
    ("experts.2.", r"makes model\.layers\.0\.mlp\.experts\.gate_up_proj of its 4 stored parts as \[2, 64, 16\], but "
                   r"MixtralForCausalLM with the folder's config holds it as \[3, 64, 16\]"),
    ("embed_tokens", r"has no tensor model\.embed_tokens\.weight, which model\.embed_tokens\.weight is made from"),
])
def test_a_folder_whose_tensors_do_not_make_the_model_s_is_refused_naming_them(tmp_path, dropped, message):
    """A per-expert folder missing one expert's matrix, or a whole expert, or any tensor: a clear refusal naming
    the tensor and its stored parts, before anything is written."""
    from safetensors.torch import load_file, save_file
    from transformers import MixtralConfig, MixtralForCausalLM

    MixtralForCausalLM(MixtralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, num_local_experts=3, vocab_size=64)).save_pretrained(
        tmp_path / "whole")
    stored = load_file(tmp_path / "whole" / "model.safetensors")
    (tmp_path / "source").mkdir()
    save_file({key: t for key, t in stored.items() if dropped not in key}, tmp_path / "source" / "model.safetensors",
              metadata={"format": "pt"})
    (tmp_path / "source" / "config.json").write_text((tmp_path / "whole" / "config.json").read_text())
    with pytest.raises(rewrite.GrowfxError, match=message):
        grow_checkpoint(tmp_path / "source", [passes.widen_mlp(factor=2)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_what_streaming_cannot_do_is_refused_and_nothing_is_written(tmp_path):
    _llama(torch.float32, False).save_pretrained(tmp_path / "source")
    with pytest.raises(rewrite.NotRepresentableError, match="has experts in every layer"):
        grow_checkpoint(tmp_path / "source", [passes.upcycle_moe(4, 2, layers=[0])], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]
    (tmp_path / "taken").mkdir()
    with pytest.raises(rewrite.GrowfxError, match="exists"):
        grow_checkpoint(tmp_path / "source", [passes.widen_mlp(factor=2)], tmp_path / "taken")
    with pytest.raises(SystemExit):
        main(["grow", str(tmp_path / "source"), "--stream", "--verify", "--pass", "widen_mlp:factor=2",
              "--out", str(tmp_path / "v")])


def test_a_config_that_computes_another_buffer_than_the_grown_model_holds_is_refused(tmp_path):
    """Gemma scales its embeddings by sqrt(hidden_size), a buffer its constructor computes. widen_hidden keeps
    the original's scale (the function is preserved), but Gemma built from the grown config would compute
    sqrt(2 x hidden): in memory, running the native class catches it; streaming runs nothing, so the computed
    buffers are compared with what the grown model holds."""
    from transformers import GemmaConfig, GemmaForCausalLM

    model = GemmaForCausalLM(GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    model.save_pretrained(tmp_path / "source")
    ids = torch.randint(0, 64, (2, 6))
    with pytest.raises(rewrite.NotRepresentableError, match="does not compute the grown function"):
        rewrite.to_native(rewrite.apply(model, [passes.widen_hidden(factor=2, init="clone")], (ids,)), model)
    with pytest.raises(rewrite.NotRepresentableError,
                       match=r"computes its buffer model.embed_tokens.embed_scale from the grown config \(\(\), "
                             r"first value \[8.0\]\), but the grown model holds \(\), first value \[5.65"):
        grow_checkpoint(tmp_path / "source", [passes.widen_hidden(factor=2, init="clone")], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    grow_checkpoint(tmp_path / "source", [passes.widen_mlp(factor=2)], tmp_path / "out")  # its buffers agree


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool, torch.float64]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), max_size=3)), min_size=1,
                max_size=6))
def test_written_files_read_back_with_safetensors(tmp_path_factory, specs):
    """Header first, then each tensor's bytes: the safetensors library reads it back, any dtype and shape
    (scalars and empty tensors too)."""
    from safetensors.torch import load_file

    path = tmp_path_factory.mktemp("st") / "t.safetensors"
    tensors = {f"t{i}": (torch.randn(shape) * 5).to(dtype) for i, (dtype, shape) in enumerate(specs)}
    write_safetensors(path, [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], tensors.__getitem__)
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[n], t) for n, t in tensors.items())
    with pytest.raises(rewrite.GrowfxError, match="announced as"):
        write_safetensors(path, [("x", (2,), torch.float32)], lambda name: torch.zeros(3))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), max_size=3), st.booleans()),
                min_size=1, max_size=6), st.booleans())
def test_tensors_copied_from_a_source_file_are_its_bytes_in_the_kernel_or_through_a_buffer(tmp_path_factory, specs,
                                                                                           in_kernel):
    """``make`` may hand back a source tensor's ``FileBytes`` instead of a tensor: the written file holds that
    tensor's bytes, mixed with made ones in any order, whether the kernel copies the range or the writer falls
    back to a small buffer (``copy_file_range`` refused, as across file systems)."""
    import contextlib
    import errno
    from unittest import mock

    from safetensors.torch import load_file, save_file

    import rewrite.io.safetensors_stream as stream

    folder = tmp_path_factory.mktemp("copy")
    tensors = {f"t{i}": (torch.randn(shape) * 5).to(dtype) for i, (dtype, shape, _) in enumerate(specs)}
    save_file({f"src.{n}": t for n, t in tensors.items()}, str(folder / "source.safetensors"), {"format": "pt"})
    reader = CheckpointReader(folder)
    copied = {f"t{i}" for i, (_, _, copy) in enumerate(specs) if copy}
    make = lambda name: reader.bytes(f"src.{name}") if name in copied else tensors[name]  # noqa: E731

    def refused(*args, **kwargs):
        raise OSError(errno.EXDEV, "cross-device")

    kernel = contextlib.nullcontext() if in_kernel else mock.patch("os.copy_file_range", refused)
    with kernel, mock.patch.object(stream, "CHUNK", 7):  # 7 bytes per copy: ranges cut mid-tensor
        write_safetensors(folder / "out.safetensors", [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], make)
    loaded = load_file(str(folder / "out.safetensors"))
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_a_copied_range_of_the_wrong_length_or_past_the_source_end_is_an_error(tmp_path):
    from safetensors.torch import save_file

    from rewrite.io.safetensors_stream import FileBytes

    save_file({"w": torch.ones(4)}, str(tmp_path / "source.safetensors"))
    reader = CheckpointReader(tmp_path)
    with pytest.raises(rewrite.GrowfxError, match=r"announced as \[5\] torch.float32 .* \(20 bytes\) but is to be "
                                                  r"copied from 16 bytes of .*source.safetensors"):
        write_safetensors(tmp_path / "a.safetensors", [("w", (5,), torch.float32)], lambda name: reader.bytes("w"))
    past_end = FileBytes(tmp_path / "source.safetensors", reader.bytes("w").offset + 8, 16)
    with pytest.raises(rewrite.GrowfxError, match="source.safetensors ended before the 16 bytes"):
        write_safetensors(tmp_path / "b.safetensors", [("w", (4,), torch.float32)], lambda name: past_end)


def test_tensors_a_growth_leaves_as_they_are_are_copied_from_the_source_file_not_read(tmp_path, monkeypatch):
    """Streaming reads only the checkpoint tensors some op changes; the others (the attention a widened MLP
    leaves alone, a block copied as it is) are copied byte for byte from the source shards, which hold the
    same values as the tensors the in-memory growth writes (``test_streamed_folder_equals_...``)."""
    model = _llama(torch.bfloat16, False)
    model.save_pretrained(tmp_path / "source", max_shard_size="20KB")
    read = []
    original = CheckpointReader.__getitem__
    monkeypatch.setattr(CheckpointReader, "__getitem__", lambda self, name: read.append(name) or original(self, name))
    plan = [passes.widen_mlp(factor=2), passes.add_layers(1, at=[0], init="copy")]
    written = grow_checkpoint(tmp_path / "source", plan, tmp_path / "out", max_shard_bytes=40_000)
    recipes = written.grown.map.recipes
    changed = {r.source for r in recipes.values() if r.source is not None and r.ops}
    assert set(read) == changed and any("mlp" in name for name in changed)
    out = CheckpointReader(tmp_path / "out")
    source = CheckpointReader(tmp_path / "source")
    unchanged = [n for n, r in recipes.items() if r.source is not None and not r.ops and n in out]
    assert len(unchanged) > 10 and any(".1.self_attn." in n for n in unchanged)  # layer 1 is the copy of 0
    assert written.copied == len(unchanged)
    assert all(torch.equal(out[n], source[recipes[n].source]) for n in unchanged)
