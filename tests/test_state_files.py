"""Training state without pickle: ``rewrite.io.state_files``."""

import json

import pytest
import torch

from rewrite.errors import GrowfxError
from rewrite.io.state_files import load_state, save_state


def test_an_optimizer_and_scheduler_state_round_trip_exactly(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9), amsgrad=True)
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [
        torch.optim.lr_scheduler.LinearLR(optimizer, 0.1, total_iters=3),
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10)], milestones=[3])
    for _ in range(4):
        model(torch.randn(5, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
    tree = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
            "counts": [1, 2.5, None, "x", (3, 4)], "nested": {7: {"__tensor__": "a literal key"}}}
    loaded = load_state(save_state(tree, tmp_path / "state"))
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["state.json", "tensors.safetensors"]
    assert loaded["counts"] == [1, 2.5, None, "x", (3, 4)] and isinstance(loaded["counts"][4], tuple)
    assert loaded["nested"] == {7: {"__tensor__": "a literal key"}}
    assert torch.equal(loaded["rng"], tree["rng"])
    assert loaded["optimizer"]["param_groups"] == tree["optimizer"]["param_groups"]  # betas a tuple again
    for index, state in tree["optimizer"]["state"].items():  # integer keys again
        for field, value in state.items():
            assert torch.equal(loaded["optimizer"]["state"][index][field], value)
    again = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9), amsgrad=True)
    again.load_state_dict(loaded["optimizer"])
    assert json.dumps(str(again.state_dict()["param_groups"])) == json.dumps(str(optimizer.state_dict()["param_groups"]))


def test_what_would_need_pickle_is_refused_with_its_path(tmp_path):
    with pytest.raises(GrowfxError, match=r"cannot save function at scheduler.lr_lambdas.0 without pickle"):
        save_state({"scheduler": {"lr_lambdas": [lambda step: 1.0]}}, tmp_path / "state")
    assert not (tmp_path / "state").exists()  # nothing half-written
    with pytest.raises(GrowfxError, match="is not a saved training state: tensors.safetensors is missing"):
        load_state(tmp_path)
