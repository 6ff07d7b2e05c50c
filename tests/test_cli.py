"""The growfx command line."""

import json
import subprocess
import sys

import pytest
import torch

from rewrite.app.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "rewrite.app.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_commands():
    result = run("--help")
    assert result.returncode == 0
    assert "inspect" in result.stdout and "demo" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "no-such-model"], "is not a built-in example"),
        (["demo", "--model", "nope"], "invalid choice: 'nope'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["inspect", "--frontend", "jit"], "invalid choice: 'jit'"),
        (["train", "--stage", "widen_mlp:fator=2"], "widen_mlp has no parameter 'fator'"),
        (["train", "--steps", "0"], "--steps must be positive, got 0"),
        (["train", "--trigger", "someday"], "invalid choice: 'someday'"),
    ],
)
def test_argument_errors_exit_2_with_one_line(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr


def test_the_executable_ends_with_main_s_code_its_output_flushed_and_its_exit_handlers_run(tmp_path):
    """``command`` leaves through ``os._exit``: what main printed into a pipe, its exit code, and the exit handlers
    (here one that writes a file) must survive that."""
    marker = tmp_path / "atexit-ran"
    script = (f"import atexit, pathlib, sys; atexit.register(pathlib.Path({str(marker)!r}).touch); "
              f"sys.argv[1:] = sys.argv[2:]; from rewrite.app.cli import command; command()")
    ok = subprocess.run([sys.executable, "-c", script, "-", "inspect", "llama"], capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0 and "blocks.0-1  LlamaBlock x2" in ok.stdout and marker.exists()
    failed = subprocess.run([sys.executable, "-c", script, "-", "grow", "hf-gpt2", "--pass",
                             "upcycle_moe:experts=2,top_k=1", "--out", str(tmp_path / "moe")],
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1 and "has no mixture-of-experts class" in failed.stderr


def test_inspect_builtin(capsys):
    assert main(["inspect", "llama"]) == 0
    out = capsys.readouterr().out
    assert "Graph of Llama (traced with torch.fx.symbolic_trace" in out
    assert "blocks.0-1  LlamaBlock x2" in out


def test_inspect_list(capsys):
    assert main(["inspect", "--list"]) == 0
    assert "hf-mixtral" in capsys.readouterr().out


def test_inspect_hugging_face_folder(tmp_path, capsys):
    from rewrite.app import zoo

    zoo.build("hf-qwen2").model.save_pretrained(tmp_path / "qwen")
    assert main(["inspect", str(tmp_path / "qwen")]) == 0
    out = capsys.readouterr().out
    assert "Graph of Qwen2ForCausalLM (traced with torch.export" in out
    assert "layers.0-1  Qwen2DecoderLayer x2" in out


def test_inspect_folder_without_config_fails_with_one_line(tmp_path):
    result = run("inspect", str(tmp_path))  # what grow does with it too: an unreadable input is an argument error
    assert result.returncode == 2
    assert result.stderr.strip() == (f"growfx: error: {tmp_path} is not a Hugging Face model folder: it has no "
                                     f"config.json (see growfx --help)")


def test_demo_grows_verifies_and_exports(tmp_path, capsys):
    assert main(["demo", "--model", "gpt", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "== graph vs model: OK" in out
    assert "widen_mlp(factor=2): blocks.0, blocks.1: 64 -> 128 (x2); exact" in out
    assert "add_heads(2): blocks.0.attn, blocks.1.attn: 4 -> 6 (x2)" in out
    assert "widen_hidden(factor=2): residual stream of pos, tok: 32 -> 64; exact" in out
    assert "add_layers(n=2, init='zero'): blocks.1; exact" in out
    assert "== grown model vs original model: OK" in out
    assert "onnx export of GPT vs onnxruntime: OK" in out
    assert (tmp_path / "gpt-grown.onnx").is_file() and (tmp_path / "gpt-grown.pt2").is_file()
    assert "== done in" in out and ": OK" in out


def test_grow_writes_a_hugging_face_folder_that_loads_and_grows_again(tmp_path):
    from transformers import LlamaForCausalLM

    from rewrite.app import zoo

    out = tmp_path / "grown"
    assert main(["grow", "hf-llama", "--pass", "widen_mlp:factor=2", "--pass", "add_layers:n=2,init=copy",
                 "--out", str(out), "--verify", "--onnx", str(tmp_path / "grown.onnx")]) == 0
    loaded = LlamaForCausalLM.from_pretrained(out).eval()
    built = zoo.build("hf-llama")
    assert loaded.config.num_hidden_layers == 4 and loaded.config.intermediate_size == 96
    torch.testing.assert_close(loaded(*built.args).logits, built.model(*built.args).logits, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "grown.onnx").is_file()
    again = tmp_path / "again"
    assert main(["grow", str(out), "--pass", "widen_hidden:factor=2", "--pass", "add_heads:n=4", "--out", str(again)]) == 0
    grown = LlamaForCausalLM.from_pretrained(again).eval()
    assert grown.config.hidden_size == 64
    torch.testing.assert_close(grown(*built.args).logits, built.model(*built.args).logits, rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "grown", "grown.onnx"]  # no temporaries left


def test_grow_writes_a_torch_export_archive_for_other_models(tmp_path):
    out = tmp_path / "gpt.pt2"
    assert main(["grow", "gpt", "--pass", "add_layers:n=1", "--out", str(out)]) == 0
    program = torch.export.load(out)
    args, _ = program.example_inputs
    from rewrite.app import zoo

    built = zoo.build("gpt")
    torch.testing.assert_close(program.module()(*args), built.model(*args), rtol=1e-5, atol=1e-6)
    assert main(["grow", str(out), "--pass", "widen_mlp:factor=2", "--out", str(tmp_path / "wider.pt2")]) == 0


@pytest.mark.parametrize("argv, message", [
    (["grow", "gpt", "--pass", "nope", "--out", "x"], "unknown pass 'nope'; choose one of widen, widen_mlp"),
    (["grow", "gpt", "--pass", "widen_mlp:size=2,foo=1", "--out", "x"], "widen_mlp has no parameter 'foo'"),
    (["grow", "gpt", "--pass", "upcycle_moe:experts=2", "--out", "x"], "upcycle_moe needs top_k"),
    (["grow", "/no/such/model", "--pass", "add_layers", "--out", "x"], "'/no/such/model' is not a built-in example"),
])
def test_grow_argument_errors_exit_2_with_one_line(argv, message):
    result = run(*argv)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) <= 2  # progress line + error


def test_a_failed_grow_leaves_no_output(tmp_path, capsys):
    out = tmp_path / "moe"
    assert main(["grow", "hf-gpt2", "--pass", "upcycle_moe:experts=2,top_k=1", "--out", str(out)]) == 1
    assert "GPT2LMHeadModel has no mixture-of-experts class growfx writes to" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main(["grow", "gpt", "--pass", "add_layers", "--out", str(tmp_path / "taken")])
    assert exit_.value.code == 2 and "exists (pass --force to replace it)" in capsys.readouterr().err

def test_an_upcycled_llama_folder_is_written_as_mixtral(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from rewrite.app import zoo

    built = zoo.build("hf-llama")
    built.model.save_pretrained(tmp_path / "llama")
    out = tmp_path / "moe"
    assert main(["grow", str(tmp_path / "llama"), "--pass", "upcycle_moe:experts=4,top_k=2", "--out", str(out)]) == 0
    assert "wrote " + str(out) + ": MixtralForCausalLM" in capsys.readouterr().out
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == "MixtralForCausalLM" and loaded.config.num_local_experts == 4
    with torch.no_grad():
        torch.testing.assert_close(loaded(*built.args).logits, built.model(*built.args).logits, rtol=1e-5,
                                   atol=1e-5)


def test_passes_lists_every_pass_with_its_exactness(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for name in ("widen_mlp(size=None, factor=None", "add_layers(n=1, at=None, init='zero'", "upcycle_moe(experts, top_k",
                 "split_layers(k=2", "net2deeper(after"):
        assert name in out
    assert "refused on post-norm (BERT)" in out


def test_train_grows_a_shakespeare_gpt_and_writes_its_log_and_picture(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--steps", "60", "--characters", "50000", "--out", str(out), "--quiet",
                 "--stage", "widen_mlp:factor=2", "--stage", "add_layers:n=1,init=copy"]) == 0
    printed = capsys.readouterr().out
    assert "grew at step 21: 75,392 -> 108,416 parameters" in printed  # the first evaluation past step 20
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    growths = [r for r in records if r["event"] == "growth"]
    assert [g["step"] for g in growths] == [21, 42]
    assert all(g["loss_after"] == pytest.approx(g["loss_before"], rel=1e-5) for g in growths)
    evals = [r for r in records if r["event"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and evals[-1]["step"] == 60
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "sample.txt").read_text()) == 301


def test_a_bfloat16_folder_is_written_back_in_bfloat16(tmp_path, capsys):
    """Growth computes in float32 and the folder comes back in the source's dtype: a 7B bfloat16 checkpoint
    must not come back as 28 GB of float32."""
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    from rewrite.app import zoo

    source = zoo.build("hf-llama").model.to(torch.bfloat16)
    source.save_pretrained(tmp_path / "bf16")
    out = tmp_path / "grown"
    assert main(["grow", str(tmp_path / "bf16"), "--pass", "widen_mlp:factor=2", "--out", str(out)]) == 0
    assert "torch.bfloat16" in capsys.readouterr().out
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    loaded = LlamaForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16 and loaded.config.intermediate_size == 96
    ids = zoo.build("hf-llama").args[0]
    with torch.no_grad():  # zero new columns: the same function, to bfloat16's accumulation order
        torch.testing.assert_close(loaded.eval()(ids).logits, source.eval()(ids).logits, rtol=1.6e-2, atol=1e-2)


def test_the_original_weights_are_freed_before_the_folder_is_written(tmp_path, monkeypatch):
    """Writing a bfloat16 folder makes a bfloat16 copy of the grown model; the original's float32 weights, which
    nothing reads any more, are freed first, so the copy takes their room (the 10-layer job: 9.1 -> 7.0 GB)."""
    import weakref

    import rewrite.app.cli as cli
    import rewrite.io.sources as sources
    from rewrite.app import zoo

    zoo.build("hf-llama").model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    loaded, alive_when_writing = [], []
    load, save = cli.load, sources.save_huggingface

    def recording_load(spec):
        source = load(spec)
        loaded.append(weakref.ref(next(source.model.parameters())))
        return source

    def checking_save(*args, **kwargs):
        alive_when_writing.append(loaded[0]() is not None)
        return save(*args, **kwargs)

    monkeypatch.setattr(cli, "load", recording_load)
    monkeypatch.setattr(sources, "save_huggingface", checking_save)
    assert main(["grow", str(tmp_path / "bf16"), "--pass", "widen_mlp:factor=2", "--out", str(tmp_path / "out")]) == 0
    assert alive_when_writing == [False]
