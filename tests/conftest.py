"""Test set-up shared by the whole suite.

Four fake CPU devices must be requested before JAX initialises its backend, so the setting lives
here, at import time of the first conftest, ahead of every test module.
"""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")

import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture
def rng():
  return np.random.default_rng(0)


@pytest.fixture(scope="session")
def shared_data_dir():
  """The read-only real data beside the checkout (../shared/data)."""
  if not SHARED_DATA.is_dir():
    pytest.fail(f"real test data not found at {SHARED_DATA}; the repository must sit next to shared/")
  return SHARED_DATA
