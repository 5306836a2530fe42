"""The language-model training scripts' schedule and state files (``accel.pipelines.training``)."""
from __future__ import annotations

import math

import pytest
import torch

from accel.pipelines.training import load_state, save_state, warm_cosine


def test_warm_cosine_against_numbers_worked_by_hand():
    assert warm_cosine(1e-3, 0, 50, 600) == pytest.approx(1e-3 / 50)  # first warm-up step, cosine at 1
    assert warm_cosine(1e-3, 49, 50, 600) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 49 / 600))))
    # warm-up done: the cosine alone
    assert warm_cosine(2.0, 300, 50, 600) == pytest.approx(2.0 * 0.55)  # halfway: cos = 0
    assert warm_cosine(2.0, 600, 100, 600) == pytest.approx(2.0 * 0.1)  # the floor at the end
    assert warm_cosine(2.0, 600, 100, 600, floor=0.0) == pytest.approx(0.0, abs=1e-12)


def test_a_state_file_round_trips_and_is_written_whole(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    path = tmp_path / "train_state.pt"
    assert load_state(path, model, optimizer, "head") == 0  # no file: start at step 0
    save_state(path, model, optimizer, 7, "head")
    assert path.is_file() and not path.with_suffix(".tmp").exists()
    assert set(torch.load(path)) == {"head", "optimizer", "step"}
    fresh = torch.nn.Linear(4, 3)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    assert load_state(path, fresh, fresh_optimizer, "head") == 7
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)
    assert fresh_optimizer.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
