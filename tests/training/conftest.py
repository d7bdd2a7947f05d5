"""The shared data of the training tests: one tiny record set for every stage, written once per module."""

import pytest

from .test_training import write_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))
