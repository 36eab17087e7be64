"""``python -m ncl_jax.gallery biases|index|search``: NCL for large galleries from embeddings.

    python -m ncl_jax.gallery biases --bank BANK.npy --gallery GALLERY.npy --temperature 0.01 \\
        --out BIASES.npy [--top_k K [--search exact|ivf] [--certify worst_case|sampled]] \\
        [--col_marginals M.npy] [--tol 1e-4] [--max_iterations N] [--bank_groups G] \\
        [--initial_biases B.npy] [--json PATH|-]
        [--coordinator_address HOST:PORT --num_processes N --process_id I]
    python -m ncl_jax.gallery index --gallery GALLERY.npy --biases BIASES.npy \\
        --temperature 0.01 --out INDEX_DIR [--kind flat|ivf|hnsw]
    python -m ncl_jax.gallery search --index INDEX_DIR --queries Q.npy --k 10 --out TOPK.npz

Embedding files are ``.npy`` [N, D] float32 or float16 with L2-normalised rows, read
memory-mapped. ``biases`` runs the dense solver on all devices (add ``--coordinator_address``,
``--num_processes`` and ``--process_id`` to span hosts; process 0 writes the outputs) or, with
``--top_k``, the sparse one (across hosts too: each process searches and holds its block of the
bank's rows): for a quick try on a large bank start with ``--top_k 128``
(the dense mode costs ``2 Nb Ng D`` FLOP per pass, and needs tens of passes). Progress lines
(with the time left) go to stderr, and the run ends with one line: what it wrote, whether it
converged, the error, passes and seconds. Outputs are never overwritten; bad input is one
``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from ncl_jax import logit_range
from ncl_jax import npy_files
from ncl_jax.errors import UserError, run_cli
from ncl_jax.gallery import inputs


class _Parser(argparse.ArgumentParser):
  """argparse whose mistakes become one UserError line instead of usage text."""

  def error(self, message):
    raise UserError(f"{message} (see --help)")


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="python -m ncl_jax.gallery", description=__doc__.split("\n\n")[0],
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
  _add_biases(commands)
  _add_index(commands)
  _add_search(commands)
  return parser


def _add_biases(commands) -> None:
  biases = commands.add_parser("biases", help="NCL biases of a gallery from a query bank")
  biases.add_argument("--bank", required=True, help="BANK.npy [Nb, D]: bank query embeddings")
  biases.add_argument("--gallery", required=True, help="GALLERY.npy [Ng, D]: item embeddings")
  biases.add_argument("--temperature", type=float, required=True,
                      help="logit temperature (the model's; 0.01 for CLIP-style models)")
  biases.add_argument("--out", required=True, help="BIASES.npy to write, float32 [Ng]")
  biases.add_argument("--top_k", type=int,
                      help="sparse mode: keep each bank query's K best items (e.g. 128): for a "
                           "quick try on a large bank, minutes where the exact dense mode takes "
                           "hours, with a certified error")
  biases.add_argument("--search", choices=("exact", "ivf"), default="exact",
                      help="sparse mode's top-k search: exact (flat, 2 Nb Ng D FLOP) or ivf "
                           "(inverted lists scanned in batches of queries: a fraction of that; "
                           "the bound covers the unscanned lists)")
  biases.add_argument("--nlist", type=int, help="--search ivf: lists (default ~4 sqrt(Ng))")
  biases.add_argument("--nprobe", type=int,
                      help="--search ivf: each query's nearest lists that its batch scans "
                           "(default 16)")
  biases.add_argument("--sample_rows", type=int, default=10_000,
                      help="sparse mode: bank rows drawn (seeded) and scored exactly against the "
                           "whole gallery for the sampled certificate (2 m Ng D FLOP; 0: none; "
                           "default 10000)")
  biases.add_argument("--confidence", type=float, default=0.999,
                      help="sparse mode: probability of the sampled certificate (default 0.999)")
  biases.add_argument("--sample_seed", type=int, default=0, help="sparse mode: the draw's seed")
  biases.add_argument("--certify", choices=("worst_case", "sampled"), default="worst_case",
                      help="sparse mode: the certificate 'converged' rests on: worst_case (a "
                           "bound for every row) or sampled (holds with --confidence)")
  biases.add_argument("--initial_biases", metavar="B.npy",
                      help="dense mode: start from these [Ng] biases, e.g. a sparse run's "
                           "--out: the same exact solution (its certified error is its own), in "
                           "fewer passes")
  biases.add_argument("--col_marginals", help="M.npy [Ng]: positive target shares (default "
                      "uniform), e.g. each video's caption count")
  biases.add_argument("--tol", type=float, default=1e-4,
                      help="relative L1 column error to reach (default 1e-4)")
  biases.add_argument("--max_iterations", type=int, default=1000, help="cap on bias updates")
  biases.add_argument("--anderson", type=int, default=8, help="Anderson memory (0: plain)")
  biases.add_argument("--json", metavar="PATH|-", help="report to PATH (new file) or '-' stdout")
  biases.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
  biases.add_argument("--bank_groups", type=int, default=1,
                      help="dense mode: split the bank's rows over G groups of devices (with G "
                           "= processes, the gallery is split within each host and the bank "
                           "across hosts; one all-reduce of the column sums per pass); default 1")
  biases.add_argument("--coordinator_address",
                      help="host:port of process 0 (multi-process; the dense mode splits the "
                           "gallery, and the bank with --bank_groups; the sparse mode the bank)")
  biases.add_argument("--num_processes", type=int, help="processes in a multi-process run")
  biases.add_argument("--process_id", type=int, help="this process's index")


def _add_index(commands) -> None:
  index = commands.add_parser("index", help="a FAISS index with the biases folded in")
  index.add_argument("--gallery", required=True, help="GALLERY.npy [Ng, D]")
  index.add_argument("--biases", required=True, help="BIASES.npy [Ng] from the biases command")
  index.add_argument("--temperature", type=float, required=True,
                     help="the temperature the biases were computed at")
  index.add_argument("--out", required=True, help="new index folder")
  index.add_argument("--kind", choices=("flat", "ivf", "hnsw"), default="flat",
                     help="flat: exact; ivf / hnsw: approximate (default flat)")
  index.add_argument("--nlist", type=int, help="ivf: number of lists (default ~4 sqrt(Ng))")
  index.add_argument("--nprobe", type=int, help="ivf: lists searched (default nlist / 32)")
  index.add_argument("--hnsw_m", type=int, default=32, help="hnsw: links per node")
  index.add_argument("--ef_search", type=int, default=128, help="hnsw: candidates per search")


def _add_search(commands) -> None:
  search = commands.add_parser("search", help="top-k NCL-normalized search of query embeddings")
  search.add_argument("--index", required=True, help="index folder from the index command")
  search.add_argument("--queries", required=True, help="Q.npy [Nq, D] query embeddings")
  search.add_argument("--k", type=int, default=10, help="results per query (default 10)")
  search.add_argument("--out", required=True, help="TOPK.npz to write: indices, scores")
  search.add_argument("--gallery", help="GALLERY.npy: refuse unless the index was built from it")


def _progress(quiet: bool):
  if quiet:
    return None
  return lambda line: print(line, file=sys.stderr, flush=True)


def _positive(value: float, flag: str) -> None:
  if not (np.isfinite(value) and value > 0):
    raise UserError(f"{flag} must be a positive number, got {value}")


def _initialize_distributed(args) -> None:
  explicit = (args.coordinator_address, args.num_processes, args.process_id)
  if all(v is None for v in explicit):
    return
  if any(v is None for v in explicit):
    raise UserError("a multi-process run needs all of --coordinator_address, --num_processes "
                    "and --process_id")
  if args.num_processes > 1:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes, process_id=args.process_id)


def _biases(args) -> int:
  _positive(args.temperature, "--temperature")
  if not (np.isfinite(args.tol) and args.tol >= 0) or args.max_iterations < 1:
    raise UserError(f"--tol must be >= 0 and --max_iterations >= 1, got {args.tol} and "
                    f"{args.max_iterations}")
  npy_files.check_new_output(args.out, "--out")
  npy_files.check_new_output(args.json, "--json")
  bank = inputs.load_checked(args.bank, "--bank")
  gallery = inputs.load_checked(args.gallery, "--gallery")
  inputs.check_same_dimension(bank, "--bank", gallery, "--gallery")
  logit_range.check_temperature(args.temperature, *logit_range.embedding_score_range(
      bank, gallery, 1 + inputs.UNIT_NORM_TOLERANCE), source="bank x gallery scores (sampled)")
  n_items = gallery.shape[0]
  if args.top_k is not None and not 1 <= args.top_k < n_items:
    raise UserError(f"--top_k must be below the gallery size {n_items} (and >= 1), got "
                    f"{args.top_k}; drop --top_k for the exact dense mode")
  if args.top_k is None and (args.search != "exact" or args.nlist or args.nprobe
                             or args.certify != "worst_case"):
    raise UserError("--search, --nlist, --nprobe and --certify belong to the sparse mode: add "
                    "--top_k K, or drop them for the exact dense mode")
  if args.top_k is not None and args.bank_groups != 1:
    raise UserError("--bank_groups belongs to the dense mode (the sparse mode always splits "
                    "the bank's rows over the processes); drop it or --top_k")
  marginals = None
  if args.col_marginals:
    marginals = npy_files.load_vector(args.col_marginals, "--col_marginals", n_items,
                                      positive=True)
  initial = None
  if args.initial_biases:
    if args.top_k is not None:
      raise UserError("--initial_biases belongs to the dense mode (it continues a sparse run "
                      "exactly): drop --top_k")
    initial = npy_files.load_vector(args.initial_biases, "--initial_biases", n_items)
  _initialize_distributed(args)
  import jax  # pylint: disable=g-import-not-at-top
  from ncl_jax.gallery import solve  # pylint: disable=g-import-not-at-top
  writer = jax.process_index() == 0
  progress = _progress(args.quiet or not writer)
  options = dict(temperature=args.temperature, col_marginals=marginals, tol=args.tol,
                 max_iterations=args.max_iterations, anderson=args.anderson, progress=progress)
  if args.top_k is None:
    solution = solve.dense_biases(bank, gallery, bank_groups=args.bank_groups,
                                  initial_bias=initial, **options)
  else:
    solution = solve.sparse_biases(
        bank, gallery, top_k=args.top_k, search=args.search, nlist=args.nlist,
        nprobe=args.nprobe, sample_rows=args.sample_rows, confidence=args.confidence,
        sample_seed=args.sample_seed, certify=args.certify, **options)
  report = dict(solution.report(), bank=list(bank.shape), gallery=list(gallery.shape),
                temperature=args.temperature, out=args.out)
  if not writer:
    return 0
  npy_files.save_new_npy(args.out, solution.bias)
  if not solution.converged:
    print(f"warning: not converged to --tol {args.tol:g}: {_why_not(solution, args)}",
          file=sys.stderr)
  print(_summary(solution, args.out), file=sys.stderr)
  text = json.dumps(report, indent=2)
  if args.json == "-":
    print(text)
  elif args.json:
    npy_files.save_new_text(args.json, text + "\n")
  return 0


def _certified(solution) -> float:
  """The certified error ``converged`` rests on."""
  if solution.certify == "sampled":
    return solution.sampled_certified_error
  return solution.certified_error


def _why_not(solution, args) -> str:
  """Why a run did not converge, and what to change."""
  if solution.mode == "dense" or solution.error > args.tol:
    return (f"the column error is {solution.error:.3g} after {solution.iterations} updates; "
            "raise --max_iterations")
  kind = ("sampled certificate (at --confidence)" if solution.certify == "sampled"
          else "omitted-mass bound")
  hint = (f"rerun with a larger --top_k (e.g. {2 * args.top_k})"
          + (" or --nprobe, or --search exact" if args.search == "ivf" else "")
          + f", or continue exactly in the dense mode from these biases (drop --top_k, add "
          f"--initial_biases {args.out})")
  if solution.certify != "sampled" and solution.sampled_certified_error is not None and (
      solution.sampled_certified_error <= args.tol):
    hint += (f"; the sampled certificate, {solution.sampled_certified_error:.3g}, meets it: "
             "--certify sampled accepts that")
  return f"the {kind} allows a column error of {_certified(solution):.3g}; {hint}"


def _summary(solution, out: str) -> str:
  """The run's last line: what was written, whether it converged, error, passes, time."""
  state = "converged" if solution.converged else "NOT converged"
  certified = ""
  if solution.mode == "sparse":
    certified = f", certified {_certified(solution):.3g} ({solution.certify})"
  return (f"wrote {out}: {state} (tol {solution.tol:g}), column error {solution.error:.3g}"
          f"{certified}, {solution.passes} passes, {solution.seconds:.1f} s")


def _index(args) -> int:
  from ncl_jax.gallery import index as index_lib  # pylint: disable=g-import-not-at-top
  _positive(args.temperature, "--temperature")
  npy_files.check_new_output(args.out, "--out")
  gallery = inputs.load_checked(args.gallery, "--gallery")
  bias = npy_files.load_vector(args.biases, "--biases", gallery.shape[0])
  for flag in ("nlist", "nprobe", "hnsw_m", "ef_search"):
    value = getattr(args, flag)
    if value is not None and value < 1:
      raise UserError(f"--{flag} must be positive, got {value}")
  if args.kind == "ivf" and args.nlist and args.nlist > gallery.shape[0]:
    raise UserError(f"--nlist {args.nlist} exceeds the gallery size {gallery.shape[0]}")
  built = index_lib.BiasedIndex.build(
      gallery, bias, temperature=args.temperature, kind=args.kind, nlist=args.nlist,
      nprobe=args.nprobe, hnsw_m=args.hnsw_m, ef_search=args.ef_search)
  built.save(args.out)
  print(f"indexed {gallery.shape[0]} items ({args.kind}) in {args.out}", file=sys.stderr)
  return 0


def _search(args) -> int:
  from ncl_jax.gallery import index as index_lib  # pylint: disable=g-import-not-at-top
  npy_files.check_new_output(args.out, "--out")
  if not args.out.endswith(".npz"):
    raise UserError(f"--out must name a .npz file, got {args.out!r}")
  index = index_lib.BiasedIndex.load(args.index)
  queries = inputs.load_checked(args.queries, "--queries")
  if queries.shape[1] != index.dim:
    raise UserError(f"--queries have dimension {queries.shape[1]} but the index "
                    f"{index.dim}; embed the queries with the gallery's model")
  if not 1 <= args.k <= len(index):
    raise UserError(f"--k must lie in [1, {len(index)}] (the gallery size), got {args.k}")
  if args.gallery:
    index.check_gallery(inputs.open_embeddings(args.gallery, "--gallery"))
  indices, scores = index.search(queries, args.k)
  npy_files.save_new_npz(args.out, indices=indices, scores=scores)
  print(f"wrote {args.out}: the top {args.k} items of {len(queries)} queries (indices int64, "
        f"scores float32 q.v/T + g, [{len(queries)}, {args.k}])", file=sys.stderr)
  return 0


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  return {"biases": _biases, "index": _index, "search": _search}[args.command](args)


if __name__ == "__main__":
  run_cli(main)
