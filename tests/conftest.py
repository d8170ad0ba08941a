import pytest
import torch


@pytest.fixture(autouse=True)
def _small_threads():
    torch.set_num_threads(2)
    yield


def tiny_config(**train) -> dict:
    """A fast digits MLP config; ``train`` keys override the train section."""
    return {
        "seed": 0,
        "data": {"train": "builtin:digits", "test_split": 0.2, "val_split": 0.1},
        "model": {"arch": "mlp", "hidden": [32]},
        "optim": {"name": "adam", "lr": 0.003},
        "train": {"epochs": 2, "batch_size": 64, "progress": False, "log_every": 5} | train,
    }
