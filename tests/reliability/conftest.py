import pytest

from tests.reliability.common import run_config
from zerotune.train.api import train


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """The uninterrupted run every interrupted one must match bit for bit."""
    return train(run_config(), out=tmp_path_factory.mktemp("reference") / "run", log=lambda *a: None)
