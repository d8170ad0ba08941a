import os

import pytest
import torch

# The suite must hold on any x86-64 CPU and thread count: run it once with, e.g.,
# ZEROTUNE_TEST_THREADS=1 ZEROTUNE_TEST_FLUSH_DENORMAL=1 make test (RELIABILITY.md records the run).
THREADS = int(os.environ.get("ZEROTUNE_TEST_THREADS", "2"))
FLUSH_DENORMAL = os.environ.get("ZEROTUNE_TEST_FLUSH_DENORMAL", "") == "1"


@pytest.fixture(autouse=True)
def _small_threads(request):
    torch.set_num_threads(THREADS)
    # hypothesis refuses to draw floats while subnormals are flushed (FloatingPointError): its tests
    # keep IEEE-754 arithmetic
    torch.set_flush_denormal(FLUSH_DENORMAL and request.node.get_closest_marker("hypothesis") is None)
    yield
    torch.set_flush_denormal(False)


def tiny_config(**train) -> dict:
    """A fast digits MLP config; ``train`` keys override the train section."""
    return {
        "seed": 0,
        "data": {"train": "builtin:digits", "test_split": 0.2, "val_split": 0.1},
        "model": {"arch": "mlp", "hidden": [32]},
        "optim": {"name": "adam", "lr": 0.003},
        "train": {"epochs": 2, "batch_size": 64, "progress": False, "log_every": 5} | train,
    }
