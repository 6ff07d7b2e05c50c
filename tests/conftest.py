import functools
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

import pretend_device  # noqa: F401  (the pretend device exists before the first backward pass of the session)

# `make test` (and so CI) runs with --hypothesis-profile=ci: the same draws every run, so a
# red CI is a regression, not a new random example. Plain `pytest` keeps exploring new draws.
settings.register_profile("ci", derandomize=True, print_blob=True)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_addoption(parser):
    parser.addoption("--skip-slow", action="store_true", help="skip tests marked slow (CI runs them)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--skip-slow"):
        skip = pytest.mark.skip(reason="--skip-slow")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same torch RNG state, whatever ran before it."""
    torch.manual_seed(0)


@functools.lru_cache(maxsize=None)
def traced(name: str):
    """(ZooModel, Graph) for a built-in example, traced once per test session."""
    import rewrite
    from rewrite.app import zoo

    built = zoo.build(name)
    return built, rewrite.trace(built.model, built.args, built.kwargs)


def grow(name: str, *plan, **options):
    """(ZooModel, rewrite.Grown): the built-in example ``name`` grown by ``plan`` (verified unless
    ``verify=False``); a typical growth test is this line and its assertions."""
    import rewrite

    built, graph = traced(name)
    return built, rewrite.apply(graph, list(plan), built.args, built.kwargs, **options)


def tiny_gpt():
    """A one-layer hand-written GPT (dim 16, MLP 24, vocabulary 32) and a batch of token ids, from seed 0."""
    from rewrite.app.zoo.handwritten import GPT

    torch.manual_seed(0)
    return GPT(vocab=32, dim=16, heads=4, hidden=24, layers=1).eval(), torch.randint(0, 32, (2, 6))


def assert_same_state(made: dict, state: dict) -> None:
    """Two state dicts with the same names, dtypes, shapes and values, bit for bit."""
    assert list(made) == list(state)
    for name, tensor in state.items():
        assert made[name].dtype == tensor.dtype and made[name].shape == tensor.shape, name
        assert torch.equal(made[name], tensor), name


def example(name: str):
    """The script ``examples/<name>.py`` as a module, loaded once (registered so its process pools can pickle
    its functions)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "examples" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
