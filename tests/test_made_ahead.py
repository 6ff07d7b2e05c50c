"""Tensors made ahead on threads are handed over in order, equal to making them one by one, within the budget."""

import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rewrite.io.made_ahead import made_in_order


class Ledger:
    """Bytes started and not yet handed back, the most ever at once, and every tensor's value by name."""

    def __init__(self, sizes: dict[str, int]):
        self.sizes, self.lock = sizes, threading.Lock()
        self.in_flight = self.most = 0

    def make(self, name: str) -> torch.Tensor:
        with self.lock:
            self.in_flight += self.sizes[name]
            self.most = max(self.most, self.in_flight)
        time.sleep(0.001 * (hash(name) % 3))  # finish out of order
        return torch.full((self.sizes[name],), float(int(name[1:])), dtype=torch.uint8)

    def release(self, name: str) -> None:
        with self.lock:
            self.in_flight -= self.sizes[name]


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 100), min_size=0, max_size=25), workers=st.integers(1, 4),
       extra=st.integers(0, 150))
def test_in_order_equal_and_within_the_budget(sizes, workers, extra):
    items = [(f"t{i}", size) for i, size in enumerate(sizes)]
    budget = max(sizes, default=0) + extra
    ledger = Ledger(dict(items))
    got = []
    for name, tensor in made_in_order(items, ledger.make, workers=workers, budget=budget):
        got.append(name)
        assert torch.equal(tensor, torch.full((ledger.sizes[name],), float(int(name[1:])), dtype=torch.uint8))
        ledger.release(name)
    assert got == [name for name, _ in items]
    assert ledger.most <= budget


def test_tensors_within_the_budget_are_made_at_once():
    together = threading.Barrier(2, timeout=10)  # broken (an error) unless two makes wait in it at once

    def make(name):
        together.wait()
        return torch.zeros(1)

    items = [(f"t{i}", 10) for i in range(6)]
    assert [name for name, _ in made_in_order(items, make, workers=2, budget=20)] == [n for n, _ in items]
    alone = threading.Barrier(2, timeout=0.5)
    with pytest.raises(threading.BrokenBarrierError):  # a budget of one tensor: t0 waits for a second that
        list(made_in_order(items, lambda name: alone.wait(), workers=2, budget=10))  # never starts


def test_a_failure_is_raised_in_order_and_stops_the_rest():
    made = []

    def make(name):
        made.append(name)
        if name == "t2":
            raise ValueError("bad tensor t2")
        return torch.zeros(1)

    items = [(f"t{i}", 1) for i in range(40)]
    got = []
    with pytest.raises(ValueError, match="bad tensor t2"):
        for name, _ in made_in_order(items, make, workers=2, budget=3):
            got.append(name)
    assert got == ["t0", "t1"]
    assert len(made) <= 6  # what was in flight, not the 40
