"""``ProgressiveTrainer``: train -> detect -> grow -> continue on a small GPT and a toy language."""

import json

import pytest

import torch
import torch.nn.functional as F

import passes
import rewrite
from rewrite.app import zoo
from rewrite.app.zoo.handwritten import GPT
from rewrite.training.triggers import Fixed, Plateau

VOCAB = 32


def batches(generator: torch.Generator, size: int = 16):
    """A toy language: each token is the previous one plus one, modulo the vocabulary."""
    while True:
        start = torch.randint(0, VOCAB, (size, 1), generator=generator)
        sequence = (start + torch.arange(13)) % VOCAB
        yield sequence[:, :-1], sequence[:, 1:]


def noisy_batches(generator: torch.Generator, size: int = 16):
    """The toy language with half of the next tokens random: its loss has a floor the model reaches."""
    while True:
        tokens = [torch.randint(0, VOCAB, (size,), generator=generator)]
        for _ in range(12):
            follow = torch.rand(size, generator=generator) < 0.5
            random = torch.randint(0, VOCAB, (size,), generator=generator)
            tokens.append(torch.where(follow, (tokens[-1] + 1) % VOCAB, random))
        sequence = torch.stack(tokens, 1)
        yield sequence[:, :-1], sequence[:, 1:]


def loss(model, batch):
    inputs, targets = batch
    return F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())


def test_two_growths_keep_the_loss_and_training_continues(tmp_path):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    validation = [next(batches(torch.Generator().manual_seed(1))) for _ in range(2)]
    trainer = rewrite.ProgressiveTrainer(
        GPT(vocab=VOCAB, dim=16, heads=2, hidden=32, layers=1),
        loss=loss,
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
        scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 10)),
        stages=[[passes.widen_mlp(factor=2)], [passes.add_layers(1, init="copy"), passes.add_heads(2)]],
        trigger=[Fixed(step=30), Fixed(step=60)],
        evaluate_every=10,
        log=tmp_path / "run.jsonl",
    ).fit(batches(generator), validation, steps=90)
    growths = [r for r in trainer.history if r["event"] == "growth"]
    assert [g["step"] for g in growths] == [30, 60]
    for g in growths:  # exact plans: the loss on the fixed batch is unchanged, and the model grew
        assert g["exact"] and abs(g["loss_after"] - g["loss_before"]) <= 1e-5
        assert g["parameters_after"] > g["parameters_before"]
    evals = [r for r in trainer.history if r["event"] == "eval"]
    assert all(b["flops"] > a["flops"] for a, b in zip(evals, evals[1:]))
    assert evals[-1]["val_loss"] < evals[3]["val_loss"]  # it kept learning after both growths
    assert evals[-1]["parameters"] == growths[-1]["parameters_after"]
    assert evals[-1]["lr"] == [3e-3]  # the warmup schedule carried across both growths, at its plateau
    lines = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    assert [line["event"] for line in lines] == [r["event"] for r in trainer.history]
    assert "widen_mlp(factor=2)" in lines[3]["report"]
    rewrite.training.carry.check_groups(trainer._optimizer, trainer.model)  # every parameter is trained


def test_a_plateau_triggers_growth_with_its_evidence():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    noisy = noisy_batches(torch.Generator().manual_seed(1))
    validation = [next(noisy) for _ in range(4)]
    trainer = rewrite.ProgressiveTrainer(
        GPT(vocab=VOCAB, dim=8, heads=2, hidden=8, layers=1),
        loss=loss,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
        stages=[[passes.widen_mlp(factor=2)]],
        trigger=Plateau(window=3, threshold=0.02, patience=2),
        evaluate_every=10,
    ).fit(noisy_batches(generator), validation, steps=400)
    growths = [r for r in trainer.history if r["event"] == "growth"]
    assert len(growths) == 1
    assert growths[0]["evidence"]["trigger"] == "plateau"
    assert growths[0]["evidence"]["relative_improvement"] < 0.02


def lm_loss(model, batch):
    """Next-token loss of a Hugging Face language model on the toy language (ids taken modulo its vocabulary)."""
    inputs, targets = batch
    logits = model(inputs).logits
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten() % logits.shape[-1])


def test_a_hugging_face_llama_keeps_training_in_its_own_class(tmp_path):
    torch.manual_seed(0)
    model = zoo.build("hf-llama").model

    validation = [next(batches(torch.Generator().manual_seed(1)))]
    trainer = rewrite.ProgressiveTrainer(
        model, loss=lm_loss, optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
        stages=[[passes.widen_mlp(factor=2)], [passes.add_layers(1, init="copy")]],
        trigger=[Fixed(step=6), Fixed(step=12)], evaluate_every=3, checkpoints=tmp_path,
    ).fit(batches(torch.Generator().manual_seed(0)), validation, steps=15)
    growths = [r for r in trainer.history if r["event"] == "growth"]
    assert [g["native"] for g in growths] == ["continues in its own class"] * 2
    assert all(abs(g["loss_after"] - g["loss_before"]) <= 1e-5 * g["loss_before"] for g in growths)
    grown = trainer.model
    assert type(grown) is type(model) and model.config.num_hidden_layers == 2  # the original is untouched
    assert grown.config.num_hidden_layers == 3
    assert grown.config.intermediate_size == 2 * model.config.intermediate_size
    assert grown.generate(validation[0][0][:1, :4], max_new_tokens=2, do_sample=False).shape == (1, 6)
    rewrite.training.carry.check_groups(trainer._optimizer, grown)
    resumed = rewrite.ProgressiveTrainer(  # resuming replays both growths into the native class
        zoo.build("hf-llama").model, loss=lm_loss, optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
        stages=[[passes.widen_mlp(factor=2)], [passes.add_layers(1, init="copy")]],
        trigger=[Fixed(step=6), Fixed(step=12)], evaluate_every=3, checkpoints=tmp_path,
    ).fit(batches(torch.Generator().manual_seed(0)), validation, steps=15, resume=tmp_path / "step-00000006-2-after")
    assert type(resumed.model) is type(model)
    for (name, a), b in zip(grown.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_an_upcycled_llama_keeps_training_as_a_graph_and_says_why():
    """to_native would give MixtralForCausalLM, whose stacked experts have other names than the grown graph's
    that the optimizer state is carried by: training continues in the graph form, with the reason logged."""
    torch.manual_seed(0)
    model = zoo.build("hf-llama").model

    trainer = rewrite.ProgressiveTrainer(
        model, loss=lm_loss, optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
        stages=[[passes.upcycle_moe(4, 2)]], trigger=[Fixed(step=3)], evaluate_every=3,
    ).fit(batches(torch.Generator().manual_seed(0)), [next(batches(torch.Generator().manual_seed(1)))], steps=6)
    growth = next(r for r in trainer.history if r["event"] == "growth")
    assert growth["native"].startswith("continues as a graph: NotRepresentableError: MixtralForCausalLM stacks the "
                                    "experts")
    assert abs(growth["loss_after"] - growth["loss_before"]) <= 1e-5 * growth["loss_before"]
    assert isinstance(trainer.model, rewrite.transform.apply.GrownModule)
    assert type(rewrite.to_native(trainer._graph, like=model)).__name__ == "MixtralForCausalLM"


@pytest.mark.parametrize("layers, dim, length", [(1, 16, 12), (3, 32, 20)])
def test_attention_flops_are_the_analytic_count(layers, dim, length):
    """Forward q k^T and p v: 2 * 2 * length * dim per token per layer, times 3 with the backward pass."""
    from rewrite.training.flops import attention_per_token

    model = GPT(vocab=VOCAB, dim=dim, heads=4, hidden=2 * dim, layers=layers)
    ids = torch.randint(0, VOCAB, (3, length))
    assert attention_per_token(model, (ids,), {}, ids.numel()) == 3 * 4 * length * dim * layers
