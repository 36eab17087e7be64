"""Package layering: the data package must not depend on the model package."""

import subprocess
import sys

import pytest

DATA_MODULES = ["ncl_jax.data", "ncl_jax.data.prepared", "ncl_jax.data.pipeline",
                "ncl_jax.data.synthetic", "ncl_jax.data.builders", "ncl_jax.data.prepare"]


@pytest.mark.parametrize("module", DATA_MODULES)
def test_data_modules_do_not_import_models(module):
  code = (f"import sys, {module}; "
          "bad = sorted(m for m in sys.modules if m.startswith('ncl_jax.models')); "
          "print(','.join(bad)); sys.exit(1 if bad else 0)")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
  assert result.returncode == 0, f"{module} imports {result.stdout.strip()} {result.stderr[-500:]}"
