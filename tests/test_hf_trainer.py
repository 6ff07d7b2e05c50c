"""``GrowingTrainer``: growing a tiny Llama inside ``transformers.Trainer``, the loss continuous across it."""

import json

import pytest
import torch

import passes
from rewrite.app import zoo
from rewrite.training.hf_trainer import GrowingTrainer
from rewrite.training.triggers import Fixed

transformers = pytest.importorskip("transformers")


class Language(torch.utils.data.Dataset):
    """The toy language (next token = previous + 1) as Trainer examples."""

    def __init__(self, vocab: int, n: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, vocab, (n, 1), generator=generator)
        self.ids = (starts + torch.arange(16)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_a_tiny_llama_grows_inside_the_trainer_and_its_loss_is_continuous(tmp_path):
    torch.manual_seed(0)
    model = zoo.build("hf-llama").model
    vocab = model.config.vocab_size
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8, learning_rate=3e-3,
        logging_steps=1, eval_strategy="steps", eval_steps=4, save_strategy="no", report_to="none",
        use_cpu=True, seed=0, disable_tqdm=True)
    trainer = GrowingTrainer(
        model=model, args=args, train_dataset=Language(vocab, 256, 0), eval_dataset=Language(vocab, 16, 1),
        stages=[[passes.widen_mlp(factor=2)], [passes.add_layers(1, init="copy")]],
        trigger=[Fixed(step=4), Fixed(step=8)])
    result = trainer.train()
    assert result.global_step == 12 and trainer.state.global_step == 12
    grown = trainer.model
    assert type(grown) is type(model)
    assert grown.config.intermediate_size == 2 * model.config.intermediate_size
    assert grown.config.num_hidden_layers == model.config.num_hidden_layers + 1
    assert [g["step"] for g in trainer.growths] == [4, 8]
    for growth in trainer.growths:  # exact growth: the loss on the fixed batch is unchanged
        assert growth["exact"] and growth["loss_after"] == pytest.approx(growth["loss_before"], rel=1e-5)
        assert growth["parameters_after"] > growth["parameters_before"]
    losses = {r["step"]: r["loss"] for r in trainer.state.log_history if "loss" in r}
    evals = {r["step"]: r["eval_loss"] for r in trainer.state.log_history if "eval_loss" in r}
    assert sorted(losses) == list(range(1, 13))  # every step logged once: resumed, not restarted
    for step in (4, 8):  # continuous across each growth (a restart would jump back towards step 1's loss)
        assert losses[step + 1] < losses[step] + 0.1 * (losses[1] - losses[step])
    assert evals[12] < evals[4]
    # the grown checkpoints are the Trainer's: the native class, its config, the carried optimizer
    saved = json.loads((tmp_path / "checkpoint-8" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 3 and saved["intermediate_size"] == grown.config.intermediate_size
    assert (tmp_path / "checkpoint-8-before-growth" / "optimizer.pt").is_file()
    assert json.loads((tmp_path / "checkpoint-4" / "growth.json").read_text())["stage"] == 0
    reloaded = type(model).from_pretrained(tmp_path / "checkpoint-8")
    assert sum(p.numel() for p in reloaded.parameters()) == trainer.growths[1]["parameters_after"]
