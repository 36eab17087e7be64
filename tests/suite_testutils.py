"""What the complete suite needs but a light test install may lack (packages, browsers, data).

Locally a missing piece skips the tests that need it, with the reason; where the complete suite
must run (``NCL_JAX_REQUIRE_ALL=1``, which ``.ci/run`` sets) it fails them instead, so a broken
install can never pass as a row of skips.
"""

import importlib
import os
import types

import pytest

REQUIRE_ALL_ENV = "NCL_JAX_REQUIRE_ALL"

# Where each package the complete suite needs comes from.
INSTALL_HINTS = {
    "torch": "pip install -e '.[test-all]' (CPU-only torch: see the README's Quickstart)",
    "transformers": "pip install -e '.[test-all]'",
    "apache_beam": "pip install -e '.[test-all]'",
    "playwright": "pip install -e '.[test-all]'",
    "clip": "pip install --no-deps clip-anytorch==2.6.0",
}


def require_all() -> bool:
  """True where a missing dependency must fail the suite instead of skipping."""
  return os.environ.get(REQUIRE_ALL_ENV, "").strip() not in ("", "0")


def unavailable(reason: str) -> None:
  """Skips the calling test (or module) locally; fails it under NCL_JAX_REQUIRE_ALL=1."""
  if require_all():
    pytest.fail(f"{reason} ({REQUIRE_ALL_ENV}=1: the complete suite needs it)", pytrace=False)
  pytest.skip(reason, allow_module_level=True)


def require_module(name: str) -> types.ModuleType:
  """The imported module, or ``unavailable`` naming the install command that provides it."""
  try:
    return importlib.import_module(name)
  except ImportError as err:
    problem = str(err)
  hint = INSTALL_HINTS.get(name.split(".")[0], "pip install -e '.[test-all]'")
  unavailable(f"no {name} ({hint}): {problem}")
