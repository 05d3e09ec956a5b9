import copy
import logging
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
logging.getLogger("diffusers").setLevel(logging.ERROR)
# pytest-xdist workers share the cores: one worker per core, one torch thread each
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads()) // _WORKERS))


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run real-scale tests and benchmarks")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow real-scale test: pass --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models():
    from export.tiny import build_tiny
    from lora_loaders.families import get_family

    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = build_tiny(family, list(get_family(family).lora_components))
        return copy.deepcopy(cache[family])

    return get
