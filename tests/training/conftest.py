"""The tiny patch store the training-engine tests share (built by tests.factories.tiny_disc_store)."""

import pytest

from tests.factories import tiny_disc_store


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    return tiny_disc_store(tmp_path_factory.mktemp("store") / "store")
