"""Fuzzing beyond the zoo: random tiny Hugging Face models, random plans, every result checked independently.

    python examples/fuzz_families.py --cases 1000 [--workers 2] [--start 0] [--stream]

Case ``i`` is drawn from ``random.Random(i)`` alone, so any case can be rerun by its number (``--start i
--cases 1``). Families: Llama, Qwen2, Qwen3, Mistral, Gemma, GPT-2, GPT-NeoX, StableLM, Phi, OPT, and in
place of some Llama and Qwen3 cases their mixtures of experts (Mixtral, Qwen3-MoE: 2-4 experts, top 1 or 2,
stored per expert in a folder, stacked in the model), with 1-4 KV heads, grouped-query ratios, head sizes 4
or 8, tied or untied embeddings, parallel residuals, biases, q/k norms where the family has them. A plan is
1-3 passes with random sizes, policies and layers. Each outcome is one of:

* ``exact``: verified exact by ``rewrite.apply``, and checked again here on fresh inputs of another batch size
  and sequence length (max abs error <= 1e-4), then written back with ``to_native`` (or refused with a reason
  the class imposes) and the native model checked the same way; with ``--stream``, the model is also saved as
  a Hugging Face folder and grown from it without loading (``grow_checkpoint``, planned on ``meta``): the
  written folder must hold the native model's tensors bit for bit, or be refused with a reason;
* ``approx``: an approximate plan whose reported error equals this script's own measurement;
* ``refused`` / ``no match``: a ``GrowfxError`` with its reason, or a pass that matched nothing;
* ``crash``: any other exception, or a grown graph that does not run; ``wrong``: an exact result that is not,
  a reported error that is not the measured one, or a pass that matched and added no parameter (every pass
  drawn here grows the model).

Ends non-zero on any crash or wrong result, and prints the counts, every crash and wrong case with its number,
and the most common refusals.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import functools
import multiprocessing
import random
import sys
import time
import warnings

import torch

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gpt2", "gpt_neox", "stablelm", "phi", "opt")
MIXTURES = {"llama": "mixtral", "qwen3": "qwen3_moe"}  # a family's mixture of experts, drawn instead of it
VOCAB = 64


@dataclasses.dataclass
class Case:
    number: int
    family: str
    config: dict
    plan: list[tuple[str, dict]]

    def __str__(self) -> str:
        plan = " + ".join(f"{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})" for name, kwargs in self.plan)
        return f"#{self.number} {self.family} {self.config} | {plan}"


def draw(number: int) -> Case:
    """Case ``number``: a family, a tiny config and a plan, from ``random.Random(number)`` alone."""
    rng = random.Random(number)
    family = rng.choice(FAMILIES)
    kv_heads = rng.choice([1, 1, 2, 4])
    ratio = rng.choice([1, 1, 2]) if family in ("llama", "qwen2", "qwen3", "mistral", "gemma") else 1
    heads, head_dim = kv_heads * ratio, rng.choice([4, 8])
    hidden = heads * head_dim
    layers = rng.randint(1, 3)
    config = {"hidden": hidden, "heads": heads, "kv_heads": heads // ratio, "head_dim": head_dim,
              "intermediate": rng.choice([2, 3, 4]) * hidden, "layers": layers, "tied": rng.random() < 0.5,
              "parallel": rng.random() < 0.5, "bias": rng.random() < 0.5, "qk_norm": rng.random() < 0.3}
    plan = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["add_layers", "split_layers", "widen_mlp", "add_heads", "widen_hidden", "widen_heads"])
        if kind == "add_layers":
            at = rng.choice([None, sorted(rng.sample(range(layers), rng.randint(1, layers)))])
            plan.append((kind, {"n": rng.randint(1, 2), "at": at, "init": rng.choice(["zero", "copy"])}))
        elif kind == "split_layers":
            plan.append((kind, {"k": 2, "layers": [rng.randrange(layers)]}))
        elif kind == "widen_mlp":
            plan.append((kind, {"factor": 2, "init": rng.choice(["zero", "clone", "net2net"])}))
        elif kind == "add_heads":
            plan.append((kind, {"n": ratio * rng.randint(1, 2)}))
        elif kind == "widen_hidden":
            plan.append((kind, {"factor": 2, "init": rng.choice(["zero", "clone"])}))
        else:
            part = rng.choice(["v", "qk"])
            plan.append((kind, {part: 2 * head_dim}))
    if family in MIXTURES and rng.random() < 0.4:  # drawn last: every other draw of a case stays as it was
        family = MIXTURES[family]
        config.update(experts=rng.randint(2, 4), top_k=rng.randint(1, 2), expert_width=rng.choice([1, 2]) * hidden,
                      norm_top_k=rng.random() < 0.5)
    return Case(number, family, config, plan)


def build(case: Case) -> torch.nn.Module:
    import transformers as t

    c = case.config
    ids = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    llama_like = {"hidden_size": c["hidden"], "intermediate_size": c["intermediate"], "num_hidden_layers": c["layers"],
                  "num_attention_heads": c["heads"], "num_key_value_heads": c["kv_heads"],
                  "tie_word_embeddings": c["tied"], **ids}
    family = case.family
    if family == "llama":
        config = t.LlamaConfig(**llama_like, head_dim=c["head_dim"], attention_bias=c["bias"], mlp_bias=c["bias"])
        return t.LlamaForCausalLM(config)
    if family == "qwen2":
        return t.Qwen2ForCausalLM(t.Qwen2Config(**llama_like))
    if family == "qwen3":
        return t.Qwen3ForCausalLM(t.Qwen3Config(**llama_like, head_dim=c["head_dim"], attention_bias=c["bias"]))
    if family == "mixtral":  # experts stored apart in a folder, stacked in the model
        return t.MixtralForCausalLM(t.MixtralConfig(**{**llama_like, "intermediate_size": c["expert_width"]},
                                                    head_dim=c["head_dim"], num_local_experts=c["experts"],
                                                    num_experts_per_tok=c["top_k"]))
    if family == "qwen3_moe":
        return t.Qwen3MoeForCausalLM(t.Qwen3MoeConfig(
            **llama_like, head_dim=c["head_dim"], attention_bias=c["bias"], num_experts=c["experts"],
            num_experts_per_tok=c["top_k"], moe_intermediate_size=c["expert_width"], norm_topk_prob=c["norm_top_k"]))
    if family == "mistral":
        return t.MistralForCausalLM(t.MistralConfig(**llama_like, head_dim=c["head_dim"]))
    if family == "gemma":
        return t.GemmaForCausalLM(t.GemmaConfig(**llama_like, head_dim=c["head_dim"]))
    if family == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(n_embd=c["hidden"], n_layer=c["layers"], n_head=c["heads"],
                                              n_inner=c["intermediate"], tie_word_embeddings=c["tied"], **ids))
    if family == "gpt_neox":
        return t.GPTNeoXForCausalLM(t.GPTNeoXConfig(
            hidden_size=c["hidden"], intermediate_size=c["intermediate"], num_hidden_layers=c["layers"],
            num_attention_heads=c["heads"], use_parallel_residual=c["parallel"], tie_word_embeddings=c["tied"],
            attention_bias=c["bias"], **ids))
    if family == "stablelm":
        return t.StableLmForCausalLM(t.StableLmConfig(
            **llama_like, use_parallel_residual=c["parallel"], qk_layernorm=c["qk_norm"], use_qkv_bias=c["bias"]))
    if family == "phi":
        return t.PhiForCausalLM(t.PhiConfig(**llama_like, qk_layernorm=c["qk_norm"]))
    if family == "opt":
        return t.OPTForCausalLM(t.OPTConfig(
            hidden_size=c["hidden"], ffn_dim=c["intermediate"], num_hidden_layers=c["layers"],
            num_attention_heads=c["heads"], word_embed_proj_dim=c["hidden"], enable_bias=c["bias"],
            tie_word_embeddings=c["tied"], **ids))
    raise ValueError(family)


def plan_of(case: Case) -> list:
    import passes

    return [getattr(passes, name)(**kwargs) for name, kwargs in case.plan]


def logits(module, ids) -> torch.Tensor:
    with torch.no_grad():
        return module(ids).logits


def run(number: int, stream: bool = False) -> tuple[str, str]:
    """(outcome, detail) of case ``number``; ``stream``: an exact case's native model is also grown from a
    saved folder without loading it, and compared."""
    import rewrite

    warnings.filterwarnings("ignore")
    case = draw(number)
    torch.manual_seed(number)
    try:
        model = build(case).eval()
    except Exception as e:  # noqa: BLE001 - the config is invalid for the family: not growfx's case
        return "invalid config", f"{type(e).__name__}: {first_line(e)}"
    ids = torch.randint(3, VOCAB, (2, 5))
    fresh = torch.randint(3, VOCAB, (3, 8))
    try:
        grown = rewrite.apply(model, plan_of(case), (ids,))
    except rewrite.GrowfxError as e:
        message = first_line(e)
        return ("crash" if "does not run" in message else "refused"), f"{type(e).__name__}: {message}"
    except Exception as e:  # noqa: BLE001 - the outcome this script exists to find
        return "crash", f"{type(e).__name__}: {first_line(e)}"
    try:
        if all(record.plan is None for record in grown.report.passes):
            return "no match", "; ".join(r for record in grown.report.passes for _, r in record.refusals[:1])
        for record in grown.report.passes:  # each pass here grows: one that matched and added nothing is a lie
            if record.plan is not None and record.parameters_after <= record.parameters_before:
                return "wrong", f"{record.name} matched and reported {record.plan.describe()}, but added no parameter"
        reference = logits(model, fresh)
        if grown.report.exact:
            error = float((logits(grown.module, fresh) - reference).abs().max())
            if not error <= 1e-4:
                return "wrong", f"exact plan, max abs error {error:.3g} on fresh inputs"
            try:
                native = rewrite.to_native(grown, like=model).eval()
            except rewrite.GrowfxError as e:
                return "exact", f"graph: {first_line(e)}"
            error = float((logits(native, fresh) - reference).abs().max())
            if not error <= 1e-4:
                return "wrong", f"native model, max abs error {error:.3g} on fresh inputs"
            return streamed(model, plan_of(case), native) if stream else ("exact", "native")
        measured = float((logits(grown.module, ids) - logits(model, ids)).abs().max())
        reported = [r.verification for r in grown.report.passes if r.verification is not None][-1].max_abs_error
        if abs(measured - reported) > 1e-6 * max(1.0, measured):
            return "wrong", f"reported error {reported:.6g}, measured {measured:.6g}"
        return "approx", f"{measured:.3g}"
    except Exception as e:  # noqa: BLE001
        return "crash", f"after growth: {type(e).__name__}: {first_line(e)}"


def streamed(model, plan: list, native) -> tuple[str, str]:
    """``model`` saved as a folder and grown by ``plan`` from it without loading it: ("exact", ...) when the
    written tensors are ``native``'s bit for bit (a tied head is not written) or streaming refuses with a
    reason, ("wrong", ...) when a tensor differs or is missing, ("crash", ...) when a graph planned on shapes
    does not run."""
    import tempfile
    from pathlib import Path

    from transformers.utils import logging as hf_logging

    import rewrite
    from rewrite.io.grow_checkpoint import grow_checkpoint
    from rewrite.io.native import is_tied_head
    from rewrite.io.stored_keys import open_checkpoint

    hf_logging.disable_progress_bar()  # save_pretrained's, once per case
    with tempfile.TemporaryDirectory() as work:
        model.save_pretrained(Path(work) / "source")
        try:
            grow_checkpoint(Path(work) / "source", plan, Path(work) / "out")
        except rewrite.GrowfxError as e:
            message = first_line(e)
            if "does not run" in message:  # planned on shapes, the graph a pass made is inconsistent
                return "crash", f"streaming: {type(e).__name__}: {message}"
            return "exact", f"native; streaming refused: {message}"
        out = open_checkpoint(native, Path(work) / "out")  # as the model's tensors, as transformers loads them
        written = {key: out[key] for key in out}
    state = native.state_dict()
    if not set(written) <= set(state):
        return "wrong", f"streamed tensors the native model lacks: {sorted(set(written) - set(state))[:3]}"
    missing = [n for n in state if n not in written and not is_tied_head(native, n)]
    if missing:
        return "wrong", f"streamed folder lacks {missing[:3]}"
    differing = [n for n, t in written.items() if t.shape != state[n].shape or not torch.equal(t, state[n])]
    if differing:
        return "wrong", f"streamed {differing[0]} differs from the native model's"
    return "exact", "native and streamed"


def first_line(error: BaseException, width: int = 160) -> str:
    text = (str(error).splitlines() or [""])[0]
    return text if len(text) <= width else text[: width - 1] + "…"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--stream", action="store_true", help="also grow each exact case from a saved folder")
    options = parser.parse_args(argv)
    numbers = range(options.start, options.start + options.cases)
    began = time.perf_counter()
    if options.workers > 1:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(options.workers, mp_context=context,
                                                    initializer=torch.set_num_threads, initargs=(1,)) as pool:
            outcomes = list(pool.map(functools.partial(run, stream=options.stream), numbers, chunksize=4))
    else:
        outcomes = [run(n, options.stream) for n in numbers]
    counts = collections.Counter(kind for kind, _ in outcomes)
    print(f"{len(outcomes)} cases in {time.perf_counter() - began:.0f} s: "
          + ", ".join(f"{kind} {count}" for kind, count in counts.most_common()))
    if options.stream:
        details = [detail for kind, detail in outcomes if kind == "exact"]
        print(f"streamed from a saved folder: {sum(d == 'native and streamed' for d in details)} written bit for bit, "
              f"{sum('streaming refused' in d for d in details)} refused by streaming")
        for number, (kind, detail) in zip(numbers, outcomes):
            if kind == "exact" and "streaming refused" in detail:
                print(f"  #{number}: {detail}")
    for number, (kind, detail) in zip(numbers, outcomes):
        if kind in ("crash", "wrong"):
            print(f"{kind}: {draw(number)}\n    {detail}")
    refusals = collections.Counter(detail.split(":")[0] + ": " + detail.split(":", 1)[-1][:90]
                                   for kind, detail in outcomes if kind == "refused")
    print("most common refusals:")
    for reason, count in refusals.most_common(12):
        print(f"  {count:4d}  {reason}")
    return 1 if counts["crash"] or counts["wrong"] else 0


if __name__ == "__main__":
    sys.exit(main())
