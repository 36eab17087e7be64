"""Test set-up shared by the whole suite.

Four fake CPU devices must be requested before JAX initialises its backend, so the setting lives
here, at import time of the first conftest, ahead of every test module.

The markers of the suite's optional parts are set here, per module (or per test where one test
of a module needs more): the core suite (``pip install -e '.[test]'``) deselects them with
``-m "not (interop or beam or browser or multiprocess or tpu or demo)"``, the complete suite
(``.[test-all]``) runs everything.
"""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")

import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from suite_testutils import unavailable  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
# The real similarity matrices (Cap4Video's MSR-VTT test set) that the shared_data_dir tests read.
SHARED_FILES = ("msrvtt_cap4video/msrvtt_titles_matrix.npy",
                "msrvtt_cap4video/msrvtt_video_matrix.npy")

# Markers of whole modules: what each needs beyond the core test install.
MODULE_MARKERS = {
    # torch, transformers and OpenAI's reference CLIP (.[test-all]).
    "test_convert_clip": "interop",
    "test_convert_clip_hf": "interop",
    "test_convert_clip_open_clip": "interop",
    "test_models_clip": "interop",
    "test_models_dual_encoder": "interop",
    # apache-beam (.[test-all]).
    "test_data_beam": "beam",
    # Groups of jax.distributed processes: minutes of CPU on a 2-core machine.
    "test_multiprocess": "multiprocess",
    # The whole Quickstart demo run (minutes), to check the numbers the docs quote from it.
    "test_demo_numbers": "demo",
    # libtpu (ncl_jax[tpu-compile], in .[test-all]): compiles for TPU topologies.
    "test_tpu": "tpu",
}
# Markers of single tests in modules that are otherwise core.
TEST_MARKERS = {
    ("test_configs", "test_tower_variants_fit_the_checkpoints_of_that_size"): "interop",
    ("test_tokenizer", "test_hugging_face_vocab_and_merges_give_transformers_ids"): "interop",
    ("test_explore", "test_page_in_chromium"): "browser",
    ("test_gallery", "test_two_processes_compute_the_same_biases"): "multiprocess",
    ("test_gallery", "test_two_processes_split_the_sparse_bank"): "multiprocess",
}


def pytest_collection_modifyitems(config, items):
  del config  # unused
  for item in items:
    module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
    test = getattr(item, "originalname", item.name)
    for marker in (MODULE_MARKERS.get(module), TEST_MARKERS.get((module, test))):
      if marker:
        item.add_marker(marker)


@pytest.fixture
def rng():
  return np.random.default_rng(0)


@pytest.fixture(scope="session")
def shared_data_dir():
  """The read-only real data beside the checkout (../shared/data); without it the tests that
  read it skip locally and fail under NCL_JAX_REQUIRE_ALL=1."""
  missing = [name for name in SHARED_FILES if not (SHARED_DATA / name).is_file()]
  if missing:
    unavailable(f"real test data not found: {', '.join(str(SHARED_DATA / n) for n in missing)} "
                "(the repository must sit next to shared/data/)")
  return SHARED_DATA
