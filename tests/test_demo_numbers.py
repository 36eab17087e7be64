"""The numbers the docs quote from the Quickstart demo run, checked against a fresh demo run.

The demo (``configs/synthetic.py``, one CPU device) is deterministic, so its results, the
explorer's hub counts and the curl example's scores and ranks are facts about the code; this
test runs the README's demo command and compares every such number in README.md,
docs/training.md (the NCL-trained rows of the ablation) and docs/explorer.md, at the precision
the docs print them. A change that moves them fails here until the docs say what the code does.
It takes one demo run (1.5 to 3.5 minutes on the 2-core VM), hence the ``demo`` marker.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
EXPLORER_DOC = (REPO / "docs" / "explorer.md").read_text()
TRAINING_DOC = (REPO / "docs" / "training.md").read_text()

pytestmark = pytest.mark.slow


def _demo_command(workdir) -> list[str]:
  """The README's Quickstart demo (the ``python -m ncl_jax.main`` part), into ``workdir``."""
  block = README.split("<!-- quickstart-demo -->", 1)[1]
  line = re.search(r"python -m ncl_jax\.main [^\n&]*", block).group(0).strip()
  args = line.split()[1:]
  assert "--workdir=/tmp/ncl_demo" in args, line
  return [sys.executable, *[f"--workdir={workdir}" if a.startswith("--workdir=") else a
                            for a in args]]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("demo") / "ncl_demo"
  env = dict(os.environ, PYTHONPATH=str(REPO))
  env.pop("JAX_NUM_CPU_DEVICES", None)  # the Quickstart runs on the machine's one CPU device
  proc = subprocess.run(_demo_command(workdir), cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=1800, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def explorer(demo):
  from ncl_jax.explore import core  # pylint: disable=g-import-not-at-top
  return core.open_explorer(workdir=str(demo))


def _shown(value: float, text: str) -> bool:
  """Whether ``text`` is ``value`` as printed with ``text``'s number of decimals."""
  decimals = len(text.split(".")[1]) if "." in text else 0
  return f"{value:.{decimals}f}" == text


def test_readme_quotes_the_demos_video_to_text_r1(demo):
  results = json.loads((demo / "results.json").read_text())["eval"]
  plain, ncl = re.search(r"plain video-to-text R@1 is low \(([\d.]+),\s+against ([\d.]+) "
                         r"NCL-normalized\)", README).groups()
  assert _shown(results["plain"]["v2t"]["R@1"], plain)
  assert _shown(results["ncl"]["v2t"]["R@1"], ncl)


@pytest.mark.parametrize("inference", ["plain", "NCL \\(training-queue bank\\)"])
def test_training_doc_rows_of_the_ncl_trained_demo(demo, inference):
  results = json.loads((demo / "results.json").read_text())
  row = re.search(rf"^\| NCL \| {inference} \| (.*?) \| (.*?) \| ([\d.]+) \|$", TRAINING_DOC,
                  re.M)
  mode = "plain" if inference == "plain" else "ncl"
  for cell, direction in zip(row.groups()[:2], ("t2v", "v2t")):
    for text, key in zip(cell.split(" / "), ("R@1", "R@5", "R@10", "MdR", "MnR")):
      assert _shown(results["eval"][mode][direction][key], text), (mode, direction, key, text)
  assert _shown(results["normalization_error"][mode], row.group(3))


def test_explorer_doc_hub_numbers(explorer):
  hubs = explorer.hubs(over="test")
  sentence = re.search(r"normalization error `mean \|mass / share - 1\|` drops from ([\d.]+) to "
                       r"([\d.]+), and the videos with more\s+than twice their share from (\d+) "
                       r"to (\d+)", EXPLORER_DOC)
  plain_error, ncl_error, plain_hubs, ncl_hubs = sentence.groups()
  assert _shown(hubs["error"]["plain"]["relative_mae"], plain_error)
  assert _shown(hubs["error"]["ncl"]["relative_mae"], ncl_error)
  assert (hubs["hubs"]["plain"], hubs["hubs"]["ncl"]) == (int(plain_hubs), int(ncl_hubs))
  bank = explorer.hubs(over="bank", order="asc")  # "1.000 for every video" over the bank
  assert all(f"{item['ncl']:.3f}" == "1.000" for item in bank["ncl"] + bank["plain"])


def test_explorer_doc_curl_example(explorer):
  block = EXPLORER_DOC.split("<!-- demo-curl -->", 1)[1].split("```", 2)[1]
  query = re.search(r'"query":"([^"]+)","k":(\d+)', block)
  result = explorer.search(text=query.group(1), k=int(query.group(2)))
  item = re.compile(r'\{"id":"(\w+)".*?"score":([\d.]+),"rank":(\d+),"plain_rank":(\d+),'
                    r'"ncl_rank":(\d+)\}', re.S)
  plain_part, ncl_part = block.split('"ncl":[', 1)
  for mode, part in (("plain", plain_part), ("ncl", ncl_part)):
    quoted = item.findall(part)
    assert len(quoted) == len(result[mode]) == int(query.group(2))
    for (video, score, rank, plain_rank, ncl_rank), got in zip(quoted, result[mode]):
      assert (got["id"], got["rank"], got["plain_rank"], got["ncl_rank"]) == (
          video, int(rank), int(plain_rank), int(ncl_rank)), (mode, got)
      assert _shown(got["score"], score), (mode, got["score"], score)
  first = result["plain"][0]
  assert f'"captions":["{first["captions"][0]}"]' in plain_part
