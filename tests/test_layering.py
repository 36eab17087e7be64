"""Package layering: the import-linter contracts in .importlinter hold, and they do catch a break.

``lint-imports`` (import-linter, in the ``test`` extra) reads every import statement of the
package, those inside functions too, without importing anything, so both tests take about a
second.
"""

import os
import pathlib
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
_LINT = "from importlinter.cli import lint_imports_command; lint_imports_command()"


def _lint_imports(root: pathlib.Path) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(root))
  return subprocess.run([sys.executable, "-c", _LINT, "--no-cache"], cwd=root, env=env,
                        capture_output=True, text=True, timeout=120, check=False)


def test_the_layering_contracts_hold():
  result = _lint_imports(REPO)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
  assert "0 broken" in result.stdout


def test_a_cycle_and_a_math_module_importing_the_trainer_break_contracts(tmp_path):
  shutil.copytree(REPO / "ncl_jax", tmp_path / "ncl_jax",
                  ignore=shutil.ignore_patterns("__pycache__", "static", "dummy_data"))
  shutil.copyfile(REPO / ".importlinter", tmp_path / ".importlinter")
  with open(tmp_path / "ncl_jax" / "queue.py", "a") as module:
    module.write("\nfrom ncl_jax import train  # noqa\n")
  with open(tmp_path / "ncl_jax" / "runs.py", "a") as module:
    module.write("\nfrom ncl_jax import export  # noqa\n")
  result = _lint_imports(tmp_path)
  assert result.returncode != 0
  broken = {line.removesuffix(" BROKEN") for line in result.stdout.splitlines()
            if line.endswith(" BROKEN")}
  assert broken == {"Math modules import no device, sharding, data, model or training code",
                    "Only the command line (main; tpu for --compile_only) imports the trainer",
                    "No import cycles between the modules of any package"}, result.stdout[-3000:]
