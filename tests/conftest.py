import functools
import os

import pytest

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


@functools.lru_cache(maxsize=None)
def traced(name: str):
    """(ZooModel, Graph) for a built-in example, traced once per test session."""
    import rewrite
    from rewrite import zoo

    built = zoo.build(name)
    return built, rewrite.trace(built.model, built.args, built.kwargs)
