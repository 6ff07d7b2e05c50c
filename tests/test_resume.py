"""Checkpoints and resume: a run interrupted anywhere, even inside a growth, ends bit-identical."""

import pytest
import torch
import torch.nn.functional as F

import passes
import rewrite
import rewrite.training.progressive as progressive
from rewrite.app.zoo.handwritten import GPT
from rewrite.training.triggers import Fixed, Plateau

VOCAB = 32


class DropoutGPT(GPT):
    """The zoo GPT with dropout on its embeddings: the run draws from the RNG, so resume must restore it."""

    def __init__(self, **sizes):
        super().__init__(**sizes)
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.drop(self.tok(ids) + self.pos(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class Language:
    """The toy language (next token = previous + 1), the same batches each time it is iterated."""

    def __init__(self, seed: int):
        self.seed = seed

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            start = torch.randint(0, VOCAB, (8, 1), generator=generator)
            sequence = (start + torch.arange(13)) % VOCAB
            yield sequence[:, :-1], sequence[:, 1:]


def loss(model, batch):
    inputs, targets = batch
    return F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())


VALIDATION = [b for b, _ in zip(Language(1), range(2))]


def trainer(folder, **options):
    torch.manual_seed(0)
    return rewrite.ProgressiveTrainer(
        DropoutGPT(vocab=VOCAB, dim=8, heads=2, hidden=16, layers=1),
        loss=loss,
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1),
        scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 8)),
        stages=[[passes.widen_mlp(factor=2)], [passes.add_layers(1, init="copy"), passes.add_heads(2)]],
        trigger=[Fixed(step=20), Plateau(window=2, threshold=1.0, patience=1)],
        evaluate_every=5, checkpoint_every=10, checkpoints=folder, rewarm=(1.3, 4), **options)


def run(folder, steps=45, **options):
    return trainer(folder, **options).fit(Language(0), VALIDATION, steps=steps)


def same(a: rewrite.ProgressiveTrainer, b: rewrite.ProgressiveTrainer) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    oa, ob = a._optimizer.state_dict(), b._optimizer.state_dict()
    for index, state in oa["state"].items():
        for field, value in state.items():
            assert torch.equal(value, ob["state"][index][field]), (index, field)
    assert oa["param_groups"] == ob["param_groups"]
    keys = ("event", "step", "val_loss", "train_loss", "flops", "lr", "parameters", "loss_after")
    assert [{k: r.get(k) for k in keys} for r in a.history] == [{k: r.get(k) for k in keys} for r in b.history]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return run(tmp_path_factory.mktemp("uninterrupted"))


def test_checkpoints_are_written_before_and_after_each_growth(uninterrupted):
    growths = [r["step"] for r in uninterrupted.history if r["event"] == "growth"]
    assert growths == [20, 35]  # the plateau trigger (window 2, threshold 1.0) fires at stage 1's third evaluation
    names = sorted(p.name for p in uninterrupted.checkpoints.iterdir())
    assert names == ["step-00000010-0-periodic", "step-00000020-1-before", "step-00000020-2-after",
                     "step-00000030-0-periodic", "step-00000035-1-before", "step-00000035-2-after",
                     "step-00000040-0-periodic"]
    for name in names:  # no pickle: safetensors and JSON only
        assert sorted(p.name for p in (uninterrupted.checkpoints / name).iterdir()) == [
            "model.safetensors", "state.json", "tensors.safetensors"]


def test_a_crash_inside_a_growth_resumes_bit_identical(uninterrupted, tmp_path, monkeypatch):
    calls = []
    real = progressive.carry

    def crash_in_second_growth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("the machine went down mid-growth")
        return real(*args, **kwargs)

    monkeypatch.setattr(progressive, "carry", crash_in_second_growth)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path)
    monkeypatch.setattr(progressive, "carry", real)
    assert max(p.name for p in tmp_path.iterdir() if p.name.startswith("step")) == "step-00000035-1-before"
    resumed = trainer(tmp_path).fit(Language(0), VALIDATION, steps=45, resume=True)
    same(uninterrupted, resumed)


@pytest.mark.parametrize("checkpoint", ["step-00000010-0-periodic", "step-00000020-1-before",
                                        "step-00000020-2-after", "step-00000030-0-periodic"])
def test_resuming_from_any_checkpoint_ends_bit_identical(uninterrupted, checkpoint, tmp_path):
    resumed = trainer(tmp_path).fit(Language(0), VALIDATION, steps=45,
                                    resume=uninterrupted.checkpoints / checkpoint)
    same(uninterrupted, resumed)


def test_resume_refuses_a_checkpoint_of_another_run(uninterrupted, tmp_path):
    other = rewrite.ProgressiveTrainer(
        GPT(vocab=VOCAB, dim=8, heads=2, hidden=16, layers=1), loss=loss,
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3), stages=[], trigger=Fixed(step=1))
    with pytest.raises(rewrite.GrowfxError, match="stage 1, but this trainer has 0 stages"):
        other.fit(Language(0), VALIDATION, steps=30, resume=uninterrupted.checkpoints / "step-00000020-2-after")
    with pytest.raises(rewrite.GrowfxError, match="no checkpoint to resume from"):
        trainer(tmp_path).fit(Language(0), VALIDATION, steps=30, resume=True)
