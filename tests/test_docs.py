"""The documentation stays true: links resolve and every documented command still starts.

Each distinct command-line entry point shown in README.md or docs/*.md (``python -m
ncl_jax.X`` modules, ``python tools/X.py`` and ``python benchmarks/X.py`` scripts) is run with
``--help`` and must exit 0. The README must stay short, with its two Quickstart commands and the complete suite's.
"""

import concurrent.futures
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_COMMAND = re.compile(r"python(?:3(?:\.11)?)? (-m (?:ncl_jax(?:\.\w+)+)|(?:tools|benchmarks)/\w+\.py)")
_LINK = re.compile(r"\]\(((?!https?://|#)[^)\s]+)\)")


def _documented_commands() -> list[str]:
  found = set()
  for path in DOC_FILES:
    found.update(match.group(1) for match in _COMMAND.finditer(path.read_text()))
  return sorted(found)


def _run_help(entry: str) -> tuple[str, subprocess.CompletedProcess]:
  args = entry.split() if entry.startswith("-m ") else [entry]
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, *args, "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
  return entry, result


def test_docs_show_the_main_entry_points():
  commands = _documented_commands()
  for expected in ("-m ncl_jax.main", "-m ncl_jax.posthoc", "-m ncl_jax.data.prepare",
                   "tools/convert_clip.py", "tools/export.py"):
    assert expected in commands


def test_every_documented_command_starts():
  commands = _documented_commands()
  # Two at a time: each start imports JAX, and the machine has two cores.
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    results = list(pool.map(_run_help, commands))
  failures = [f"python {entry} --help: exit {result.returncode}\n{result.stderr[-800:]}"
              for entry, result in results if result.returncode != 0]
  assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
  for target in _LINK.findall(doc.read_text()):
    path = (doc.parent / target.split("#", 1)[0]).resolve()
    assert path.exists(), f"{doc.name} links to missing {target}"


def test_readme_is_short_and_has_the_quickstart():
  text = (REPO / "README.md").read_text()
  assert len(text.splitlines()) <= 300
  for marker in ("<!-- quickstart-demo -->", "<!-- quickstart-test -->", "<!-- complete-test -->"):
    assert marker in text
