"""Shared fixtures: small synthetic datasets made by the tests themselves."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

from unetcell.synth import write_dataset  # noqa: E402


@pytest.fixture(scope="session")
def synth_folder(tmp_path_factory):
    """Four 128 x 128 synthetic images with instance masks."""
    folder = tmp_path_factory.mktemp("synth")
    write_dataset(folder, count=4, shape=(128, 128), seed=3)
    return folder
