"""Every shipped recipe validates; the MNIST recipes run end to end on IDX files written here."""

from pathlib import Path

import pytest

from tests.helpers import write_digits_idx
from zerotune.config import load_config
from zerotune.evaluate.api import evaluate
from zerotune.train.api import train

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))
QUIET = {"log": lambda *a: None}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_is_a_valid_config(path):
    cfg = load_config(path)
    assert cfg.model.arch


def test_recipes_cover_the_documented_set():
    names = {p.stem for p in CONFIGS}
    assert {"digits_mlp", "digits_cnn", "digits_rnn", "mnist_mlp", "mnist_cnn", "cifar10_resnet",
            "diabetes_regression", "pydoc_gpt_tiny", "gpt2_124m"} <= names


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    write_digits_idx(root, size=28, gz=True)
    return root


@pytest.mark.parametrize("recipe", ["mnist_mlp", "mnist_cnn"])
def test_mnist_recipes_end_to_end_on_idx_files(recipe, mnist_dir, tmp_path):
    path = Path(__file__).parent.parent / "configs" / f"{recipe}.yaml"
    run = train(path, out=tmp_path / recipe, overrides=[f"data.train=idx:{mnist_dir}", "train.epochs=2",
                                                        "train.progress=false"], **QUIET)
    result = evaluate(run)
    assert result["split"] == "test" and result["n"] > 100  # the t10k files are the test split
    assert result["accuracy"] > 0.8
    assert load_config(run / "config.yaml").model.arch in ("mlp", "cnn")
