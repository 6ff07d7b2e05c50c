"""The growfx command line."""

import subprocess
import sys

import pytest

from rewrite.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "rewrite.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_commands():
    result = run("--help")
    assert result.returncode == 0
    assert "inspect" in result.stdout and "demo" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "no-such-model"], "neither a built-in example"),
        (["demo", "--model", "nope"], "invalid choice: 'nope'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["inspect", "--frontend", "jit"], "invalid choice: 'jit'"),
    ],
)
def test_argument_errors_exit_2_with_one_line(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr


def test_inspect_builtin(capsys):
    assert main(["inspect", "llama"]) == 0
    out = capsys.readouterr().out
    assert "Graph of Llama (traced with torch.fx.symbolic_trace" in out
    assert "blocks.0-1  LlamaBlock x2" in out


def test_inspect_list(capsys):
    assert main(["inspect", "--list"]) == 0
    assert "hf-mixtral" in capsys.readouterr().out


def test_inspect_hugging_face_folder(tmp_path, capsys):
    from rewrite import zoo

    zoo.build("hf-qwen2").model.save_pretrained(tmp_path / "qwen")
    assert main(["inspect", str(tmp_path / "qwen")]) == 0
    out = capsys.readouterr().out
    assert "Graph of Qwen2ForCausalLM (traced with torch.export" in out
    assert "layers.0-1  Qwen2DecoderLayer x2" in out


def test_inspect_folder_without_config_fails_with_one_line(tmp_path):
    result = run("inspect", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip() == f"growfx: error: {tmp_path} is not a Hugging Face model folder: it has no config.json"


def test_demo_grows_verifies_and_exports(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "== graph vs model: OK" in out
    assert "widen_mlp(factor=2): blocks.0, blocks.1: 64 -> 128 (x2); exact" in out
    assert "add_heads(2): blocks.0.attn, blocks.1.attn: 4 -> 6 (x2)" in out
    assert "widen_hidden(factor=2): residual stream of pos, tok: 32 -> 64; exact" in out
    assert "add_layers(n=2, init='zero'): blocks.1; exact" in out
    assert "== grown model vs original model: OK" in out
    assert "onnx export of GPT vs onnxruntime: OK" in out
    assert (tmp_path / "gpt-grown.onnx").is_file()
