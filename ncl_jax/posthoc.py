"""Post-hoc normalization and retrieval metrics for a dumped similarity matrix.

Usage::

  python -m ncl_jax.posthoc SIMS.npy --method {none,ncl,dsl,qbnorm,is,csls,nnn,dn,dualis}
      [--bank test|BANK.npy] [--v2t-bank test|VBANK.npy] [--temperature 0.01] [--gt MAP.npy]
      [--alpha A] [method options] [--gallery-bank GBANK.npy --v2t-gallery-bank VGBANK.npy]
      [--select given|bank|val] [--bank-gt BANK_MAP.npy] [--v2t-bank-gt VBANK_MAP.npy]
      [--val VAL.npy [--val-gt MAP.npy] [--val-bank VALBANK.npy] [--val-v2t-bank VALVBANK.npy]]
      [--plot OUT.png] [--json PATH|-]
  python -m ncl_jax.posthoc --demo --method ncl      # a generated matrix, no files needed

``SIMS.npy`` is [n_texts, n_videos]: rows are text queries, columns videos (raw cosine
similarities). The ground truth is the diagonal unless ``--gt MAP.npy`` gives each text's video
index ([n_texts] integers, multi-caption data). ``--temperature`` divides the similarities before
any softmax or Sinkhorn step (0.01 for CLIP-style models; at 1 normalization barely sees the
scores' structure).

Banks. Text-to-video (t2v) normalizes the test text queries with a bank of text queries x the
test videos: ``--bank test`` (default) uses the test queries themselves (transductive);
``--bank BANK.npy`` ([n_bank, n_videos], e.g. training captions x test videos) is inductive.
Video-to-text (v2t) needs a bank of *video* queries x the test captions: ``--v2t-bank test``
(default) uses the test videos, i.e. the test matrix transposed (transductive, also when
``--bank`` is a file); ``--v2t-bank VBANK.npy`` ([n_bank_videos, n_texts], e.g. training videos
x test captions) is inductive. ``dsl`` is always transductive and accepts no bank file (except
as a labelled selection bank with ``--select bank``).

The methods, their options (flags, defaults, grids) and their help come from the normalizer
registry (:data:`ncl_jax.normalize.REGISTRY`). ``dualis`` also needs gallery-side banks:
``--gallery-bank`` (e.g. training videos x test videos) and ``--v2t-gallery-bank`` (training
captions x test captions).

Hyper-parameters. ``--select given`` (default) uses the method's flags (``--alpha``,
``--qb-beta``, ...) as given; ``--select bank`` chooses them per direction on that direction's
bank alone (:mod:`ncl_jax.selection`: pseudo-queries vs pseudo-bank halves, scored by the
label-free relative normalization error, or by R@1 when ``--bank-gt`` / ``--v2t-bank-gt``
label the bank files' rows); ``--select val`` chooses them by R@1 on a validation split:
``--val`` (validation queries x validation gallery, ``--val-gt`` its map) normalized with
``--val-bank`` / ``--val-v2t-bank``, the same kind of banks scored against the validation
gallery (never the test one; needed when the test banks are files). The values used are in
JSON ``"hyperparameters"``, the selection's rule and grid scores in ``"selection"``.

Output: a table on stdout (on stderr when ``--json -`` writes JSON to stdout) with, per
direction, the plain row, the method's row and their difference, and, with ``--json``,
``{"method", "t2v": {R@1, R@5, R@10, MdR, MnR}, "v2t": {...}, "plain": {"t2v", "v2t"},
"delta": {"t2v", "v2t"}, "normalization_error": {"before", "after"},
"normalization_error_detail": {"t2v": {"before": {...}, "after": {...}}, "v2t": {...}},
"hyperparameters": {"t2v", "v2t"}}`` (plus ``"selection"`` with ``--select bank`` or ``val``):
``t2v``/``v2t`` are the method's metrics, ``plain`` the unnormalized ones, ``delta`` method minus
plain (R@K in percent, differences in points). ``--method none`` writes its (plain) metrics
once, as ``t2v``/``v2t``, with no ``plain`` or ``delta`` block. ``before``/``after`` are the t2v
mean absolute error of each video's summed retrieval probability against its expected share;
the detail gives, per direction, the absolute (``mae``, ``max``) and relative
(``relative_mae``, ``relative_max``: ``|mass / expected - 1|``) errors.
Existing output files are never overwritten.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import NamedTuple

import numpy as np

from ncl_jax import logit_range, metrics, npy_files, plots
from ncl_jax import normalize as norm_lib
from ncl_jax import selection as selection_lib
from ncl_jax.errors import UserError, run_cli

_FINITE_CHECK_ROWS = 8192


# --select val's inputs: (flag, metavar, help).
_VALIDATION_FLAGS = (
    ("--val", "VAL.npy", "validation queries x validation gallery [n_val_texts, n_val_videos], "
                         "disjoint from the test split"),
    ("--val-gt", "VAL_MAP.npy", "[n_val_texts] int, each validation text's video (default: the "
                                "diagonal)"),
    ("--val-bank", "VALBANK.npy", "the t2v bank's kind of queries scored against the validation "
                                  "videos [n_bank, n_val_videos] (never the test ones); required "
                                  "with a --bank file, else the validation queries are their own "
                                  "bank"),
    ("--val-v2t-bank", "VALVBANK.npy", "video queries scored against the validation captions "
                                       "[n_bank_videos, n_val_texts]; required with a --v2t-bank "
                                       "file"),
    ("--val-gallery-bank", "VALGBANK.npy", "dualis: gallery-side bank against the validation "
                                           "videos"),
    ("--val-v2t-gallery-bank", "VALVGBANK.npy", "dualis: gallery-side bank against the "
                                                "validation captions"),
)


class _Parser(argparse.ArgumentParser):
  """argparse whose mistakes become one UserError line instead of usage text."""

  def error(self, message):
    raise UserError(f"{message} (see --help)")


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(
      prog="python -m ncl_jax.posthoc",
      description=f"Post-hoc normalization ({', '.join(norm_lib.method_names())}) of a "
                  "[n_texts, n_videos] similarity matrix: t2v/v2t retrieval metrics, plain and "
                  "normalized side by side.")
  parser.add_argument("sims", nargs="?", help="SIMS.npy, [n_texts, n_videos] similarities")
  parser.add_argument("--demo", action="store_true",
                      help="use a generated 400 x 400 matrix with miscalibrated videos "
                           "instead of SIMS.npy")
  rows = [norm_lib.normalizer(name) for name in norm_lib.method_names()]
  parser.add_argument("--method", choices=[row.name for row in rows], default="none",
                      help="; ".join(row.summary for row in rows) + ". Default: none")
  parser.add_argument("--bank", default="test", metavar="test|BANK.npy",
                      help="t2v query bank: 'test' (transductive) or BANK.npy [n_bank, n_videos]")
  parser.add_argument("--v2t-bank", default="test", metavar="test|VBANK.npy",
                      help="v2t query bank: 'test' (test matrix transposed, transductive) or "
                           "VBANK.npy [n_bank_videos, n_texts]")
  parser.add_argument("--temperature", type=float, default=0.01,
                      help="similarities are divided by it before any softmax/Sinkhorn "
                           "(default 0.01, CLIP's logit scale 100)")
  parser.add_argument("--gt", metavar="MAP.npy", help="MAP.npy, [n_texts] int: the video index of each text")
  parser.add_argument("--tie", choices=metrics.TIE_POLICIES, default="pessimistic",
                      help="rank of a ground truth tied with other candidates: optimistic "
                           "(1 + #higher), pessimistic (1 + #higher or equal; default) or mean")
  parser.add_argument("--v2t-protocol", choices=metrics.V2T_PROTOCOLS, default="strict",
                      help="multi-caption v2t: strict (all captions ranked) or group_max "
                           "(CLIP4Clip)")
  _add_knob_flags(parser, rows)
  parser.add_argument("--gallery-bank", metavar="GBANK.npy",
                      help="dualis, t2v: gallery-side bank [n_gallery_bank, n_videos], e.g. "
                           "training videos scored against the test videos (video x video)")
  parser.add_argument("--v2t-gallery-bank", metavar="VGBANK.npy",
                      help="dualis, v2t: [n_gallery_bank, n_texts], e.g. training captions "
                           "scored against the test captions (text x text)")
  parser.add_argument("--select", choices=("given", "bank", "val"), default="given",
                      help="given: use the option values above (default); bank: choose the "
                           "method's options (its grid, alpha included, in "
                           "docs/normalization.md) on each direction's bank alone (label-free "
                           "cross-validated balance); val: choose them by R@1 on a validation "
                           "split (--val, --val-bank, ...); never on the test queries' labels")
  for flag, metavar, text in _VALIDATION_FLAGS:
    parser.add_argument(flag, metavar=metavar, help=f"--select val: {text}")
  parser.add_argument("--bank-gt", metavar="BANK_MAP.npy",
                      help="--select bank with a --bank file: [n_bank] int, each bank row's "
                           "correct video; selects by the bank's R@1 instead of its balance")
  parser.add_argument("--v2t-bank-gt", metavar="VBANK_MAP.npy",
                      help="the same for the --v2t-bank file: each bank video's correct caption")
  parser.add_argument("--plot", metavar="OUT.png", help="OUT.png: t2v histograms before/after (not overwritten)")
  parser.add_argument("--json", metavar="PATH|-", help="PATH (not overwritten) or '-' for stdout")
  return parser


def _add_knob_flags(parser: argparse.ArgumentParser, rows) -> None:
  """One option per registry knob flag; rows that share a flag share the option."""
  users: dict[str, list] = {}
  for row in rows:
    for knob in row.knobs:
      users.setdefault(knob.flag, []).append((row.name, knob))
  for flag, pairs in users.items():
    parser.add_argument(flag, type=pairs[0][1].kind, default=None, help=_knob_help(pairs))


def _knob_help(pairs) -> str:
  """``"ncl, is: <help> (default 1); nnn: <help> (default 0.75)"`` for one flag's users."""
  groups: dict[tuple, list] = {}
  for name, knob in pairs:
    shown = ("" if callable(knob.default) or "default" in knob.help
             else f" (default {knob.default:g})")
    groups.setdefault((knob.help, shown), []).append(name)
  return "; ".join(f"{', '.join(names)}: {text}{shown}"
                   for (text, shown), names in groups.items())


def _load_matrix(path: str, what: str) -> np.ndarray:
  """Memory-maps a 2-D finite float matrix from a .npy file or raises UserError."""
  array = npy_files.open_matrix(path, what)
  if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
    raise UserError(f"{what} must hold numbers, got dtype {array.dtype} in {path!r}")
  for start in range(0, array.shape[0], _FINITE_CHECK_ROWS):
    block = np.asarray(array[start:start + _FINITE_CHECK_ROWS])
    if not np.all(np.isfinite(block)):
      row = start + int(np.flatnonzero(~np.all(np.isfinite(block), axis=1))[0])
      raise UserError(f"{what} {path!r} contains NaN or Inf (first in row {row}); "
                      f"fix the matrix before evaluating")
  return array


def _load_map(path: str, n_texts: int, n_videos: int, flag: str = "--gt") -> np.ndarray:
  """Loads and checks a caption->video index map that covers every video."""
  mapping = npy_files.load_index_map(path, flag, n_texts, n_videos, row="text row",
                                     target="video")
  missing = np.flatnonzero(np.bincount(mapping, minlength=n_videos) == 0)
  if missing.size:
    raise UserError(f"{missing.size} videos have no caption in {flag} (first: {missing[0]}); "
                    f"every video column needs at least one text row")
  return mapping


def _load_bank_map(path: str, bank: np.ndarray, flag: str) -> np.ndarray:
  """Loads a bank's row -> correct candidate map ([n_bank] int in [0, n_candidates))."""
  n_rows, n_cols = bank.shape
  return npy_files.load_index_map(path, flag, n_rows, n_cols, row="bank row", target="candidate")


def demo_matrix(n: int = 400, dim: int = 32, seed: int = 0) -> np.ndarray:
  """A [n, n] similarity matrix with miscalibrated videos (ground truth on the diagonal).

  Captions are noisy copies of their video's embedding; each video's scores then get a random
  offset, the per-instance miscalibration that makes some videos hubs (too much summed
  retrieval probability) and others nearly unretrievable: what NCL's biases correct.
  """
  rng = np.random.default_rng(seed)
  videos = rng.standard_normal((n, dim))
  videos /= np.linalg.norm(videos, axis=1, keepdims=True)
  texts = videos + 1.8 * rng.standard_normal((n, dim)) / np.sqrt(dim)
  texts /= np.linalg.norm(texts, axis=1, keepdims=True)
  offsets = 0.02 * rng.standard_normal(n)
  return (0.3 * (texts @ videos.T) + offsets[None, :]).astype(np.float32)


def _bank_label(bank_arg: str, direction: str) -> str:
  if bank_arg == "test":
    return "test videos (test matrix transposed)" if direction == "v2t" else "test text queries"
  return f"{bank_arg}"


def _direction_ranks(args, direction: str, scores, mapping=None) -> np.ndarray:
  """1-based ground-truth ranks of one direction's [n_queries, n_candidates] scores."""
  if direction == "t2v":
    return metrics.t2v_ranks(scores, mapping, tie=args.tie)
  return metrics.v2t_ranks(scores, mapping, protocol=args.v2t_protocol, tie=args.tie)


def _direction_metrics(args, direction: str, scores, mapping=None) -> dict:
  """R@1/5/10, MdR, MnR of one direction's [n_queries, n_candidates] scores."""
  if direction == "t2v":
    return metrics.t2v_metrics(scores, mapping, tie=args.tie)
  return metrics.v2t_metrics(scores, mapping, protocol=args.v2t_protocol, tie=args.tie)


def _difference(method: dict, plain: dict) -> dict:
  """Method minus plain for every metric (R@K in points; negative MdR/MnR is better)."""
  return {name: method[name] - plain[name] for name in metrics.METRIC_NAMES}


def _method_options(args) -> dict:
  """The method's option values: given flags, else the registry defaults."""
  row = norm_lib.normalizer(args.method)
  return {knob.name: knob.value(getattr(args, _dest(knob.flag)), args.temperature)
          for knob in row.knobs}


def _dest(flag: str) -> str:
  return flag.lstrip("-").replace("-", "_")


def _knob_values(args, options: dict) -> dict:
  """The values of the method's selectable options that this run uses."""
  return {name: options[name] for name in norm_lib.normalizer(args.method).grid}


class _Problem(NamedTuple):
  """One direction: queries x candidates, its bank (None: the queries), ground truth, shares."""

  raw: np.ndarray
  bank: np.ndarray | None
  gallery_bank: np.ndarray | None
  mapping: np.ndarray | None
  expected: np.ndarray


def _problems(sims, mapping, banks: dict, gallery_banks: dict) -> dict[str, _Problem]:
  """The t2v and v2t problems of a [n_texts, n_videos] matrix."""
  n_texts, n_videos = sims.shape
  return {
      "t2v": _Problem(sims, banks["t2v"], gallery_banks["t2v"], mapping,
                      norm_lib.expected_mass(n_texts, n_videos, mapping, direction="t2v")),
      "v2t": _Problem(sims.T, banks["v2t"], gallery_banks["v2t"], mapping,
                      norm_lib.expected_mass(n_videos, n_texts, mapping, direction="v2t"))}


def _choose(args, direction: str, problem: _Problem, inputs) -> selection_lib.Selection | None:
  """``--select bank`` / ``val``: the method's options chosen without the test labels."""
  if args.select == "bank":
    return selection_lib.select_on_bank(
        args.method, problem.raw if problem.bank is None else problem.bank,
        temperature=args.temperature, bank_gt=inputs.bank_gts[direction],
        col_marginals=problem.expected, gallery_bank=problem.gallery_bank)
  if args.select == "val":
    val = inputs.val[direction]
    return selection_lib.select_on_queries(
        args.method, val.raw, val.bank, temperature=args.temperature,
        ranks=functools.partial(_direction_ranks, args, direction, mapping=val.mapping),
        col_marginals=val.expected, gallery_bank=val.gallery_bank)
  return None


def _normalized(args, direction: str, problem: _Problem, inputs) -> tuple[dict, dict, dict]:
  """The method's metrics, options used and candidate mass of one direction."""
  row = norm_lib.normalizer(args.method)
  options = _method_options(args)
  try:
    chosen = _choose(args, direction, problem, inputs)
    if chosen is not None:
      options.update(chosen.values)
    # A transductive-only method's bank (if any) only served the selection.
    scores = norm_lib.normalize(problem.raw, args.method,
                                problem.bank if row.uses_bank else None,
                                temperature=args.temperature, col_marginals=problem.expected,
                                gallery_bank=problem.gallery_bank, **options)
  except ValueError as err:  # invalid option values (k out of range, ...)
    raise UserError(str(err)) from None
  return (_direction_metrics(args, direction, scores, problem.mapping),
          _knob_values(args, options), {"mass": norm_lib.candidate_mass(scores),
                                        "selection": chosen})


def _evaluate(args, inputs) -> tuple[dict, dict]:
  """Plain and normalized metrics of both directions, and the normalization errors.

  The plain metrics and the plain candidate mass are computed once per matrix; ``none``
  reuses them as its own result instead of a second pass.

  Returns:
    ``(result, errors)``: ``result`` is the JSON payload (``method``, the method's ``t2v`` and
    ``v2t``, ``plain``, ``delta`` and ``hyperparameters`` unless the method is ``none``,
    ``selection`` with ``--select bank`` or ``val``, ``normalization_error`` and its detail);
    ``errors[direction]`` holds ``before``/``after`` error dicts and ``mass``.
  """
  problems = _problems(inputs.sims, inputs.mapping,
                       {"t2v": inputs.bank, "v2t": inputs.v2t_bank}, inputs.gallery_banks)
  plain, method, errors, knobs, selections = {}, {}, {}, {}, {}
  for direction, problem in problems.items():
    plain[direction] = _direction_metrics(args, direction, problem.raw, problem.mapping)
    before = norm_lib.candidate_mass(problem.raw, scale=1.0 / args.temperature)
    if args.method == "none":
      method[direction], after = plain[direction], before
    else:
      method[direction], knobs[direction], extra = _normalized(args, direction, problem, inputs)
      after = extra["mass"]
      if extra["selection"] is not None:
        selections[direction] = extra["selection"]
    errors[direction] = {
        "before": norm_lib.normalization_error(before, problem.expected),
        "after": norm_lib.normalization_error(after, problem.expected),
        "mass": (before, after, problem.expected)}
  result = {"method": args.method, "t2v": method["t2v"], "v2t": method["v2t"]}
  if args.method != "none":
    result["plain"] = plain
    result["delta"] = {d: _difference(method[d], plain[d]) for d in plain}
    result["hyperparameters"] = knobs
  if selections:
    result["selection"] = {"rule": args.select,
                           **{d: sel.as_json() for d, sel in selections.items()}}
  result["normalization_error"] = {"before": errors["t2v"]["before"]["mae"],
                                   "after": errors["t2v"]["after"]["mae"]}
  result["normalization_error_detail"] = {
      d: {when: {k: v for k, v in errors[d][when].items() if k != "histogram"}
          for when in ("before", "after")} for d in errors}
  return result, errors


def _metric_cells(values: dict, signed: bool = False) -> str:
  sign = "+" if signed else ""
  return (f"{values['R@1']:{sign}6.1f} {values['R@5']:{sign}6.1f} {values['R@10']:{sign}6.1f} "
          f"{values['MdR']:{sign}6.1f} {values['MnR']:{sign}8.2f}")


def _error_cell(error: dict) -> str:
  return (f"{error['mae']:7.4f} / {error['max']:6.3f}   "
          f"{error['relative_mae']:7.4f} / {error['relative_max']:6.3f}")


def _table(args, result, errors, sims_shape, bank_shapes) -> str:
  """Per direction: the plain row, the method's row and their difference."""
  n_texts, n_videos = sims_shape
  lines = [f"method: {args.method}   temperature: {args.temperature:g}   tie policy: {args.tie}   "
           f"v2t protocol: {args.v2t_protocol}"]
  for direction, n_q, n_c, bank_arg, shape in (
      ("t2v", n_texts, n_videos, args.bank, bank_shapes[0]),
      ("v2t", n_videos, n_texts, args.v2t_bank, bank_shapes[1])):
    setting = norm_lib.setting(args.method, bank_arg == "test")
    uses_bank = norm_lib.normalizer(args.method).uses_bank
    role = "bank" if uses_bank else "selection bank"
    bank_text = ("" if args.method == "none" or (not uses_bank and bank_arg == "test")
                 else f", {role}: {_bank_label(bank_arg, direction)} {shape[0]} x {shape[1]}")
    lines.append(f"{direction}: {n_q} queries x {n_c} candidates, {setting}{bank_text}")
    knobs = result.get("hyperparameters", {}).get(direction)
    if knobs:
      how = "given"
      if "selection" in result and result["selection"]["rule"] == "val":
        how = "selected by validation R@1"
      elif "selection" in result:
        how = f"selected on the bank by {result['selection'][direction]['criterion']}"
      values = ", ".join(f"{name} {value:g}" for name, value in knobs.items())
      lines.append(f"     {args.method} options: {values} ({how})")
  lines.append("")
  lines.append(f"{'':5s} {'':8s} {'R@1':>6s} {'R@5':>6s} {'R@10':>6s} {'MdR':>6s} {'MnR':>8s}"
               f"   {'abs. norm. error':>16s}   {'rel. norm. error':>16s}")
  lines.append(f"{'':5s} {'':8s} {'':34s}   {'mean / max':>16s}   {'mean / max':>16s}")
  for direction in ("t2v", "v2t"):
    e = errors[direction]
    if args.method == "none":
      lines.append(f"{direction:5s} {'plain':8s} {_metric_cells(result[direction])}   "
                   f"{_error_cell(e['before'])}")
      continue
    lines.append(f"{direction:5s} {'plain':8s} {_metric_cells(result['plain'][direction])}   "
                 f"{_error_cell(e['before'])}")
    lines.append(f"{'':5s} {args.method:8s} {_metric_cells(result[direction])}   "
                 f"{_error_cell(e['after'])}")
    lines.append(f"{'':5s} {'delta':8s} {_metric_cells(result['delta'][direction], True)}")
  return "\n".join(lines)


class _Inputs(NamedTuple):
  """The loaded test matrix, its ground truth and the banks (None: the test queries)."""

  sims: np.ndarray
  mapping: np.ndarray | None
  bank: np.ndarray | None
  v2t_bank: np.ndarray | None
  bank_gts: dict
  bank_shapes: tuple
  gallery_banks: dict
  val: dict | None  # --select val: {"t2v": _Problem, "v2t": _Problem} of the validation split


def _check_args(args) -> None:
  """Every mistake that the arguments alone reveal, before any file is read."""
  if args.demo == bool(args.sims):
    raise UserError("give exactly one of SIMS.npy or --demo")
  _check_values(args)
  row = norm_lib.normalizer(args.method)
  if row.transductive_only and args.select != "bank" and (
      args.bank != "test" or args.v2t_bank != "test"):
    raise UserError(f"{args.method} is transductive (it normalizes over the test queries); drop "
                    f"--bank and --v2t-bank (a labelled bank serves {args.method} only with "
                    f"--select bank)")
  if not row.balance and args.select == "bank" and not (args.bank_gt and args.v2t_bank_gt):
    raise UserError(f"{args.method} rescales logits rather than balancing them, so --select bank "
                    f"chooses its options by R@1 on labelled banks: give --bank BANK.npy "
                    f"--bank-gt BANK_MAP.npy and --v2t-bank VBANK.npy --v2t-bank-gt "
                    f"VBANK_MAP.npy ({args.method} itself still normalizes over the test queries)")
  for flag, value, bank_flag, bank_value in (("--bank-gt", args.bank_gt, "--bank", args.bank),
                                             ("--v2t-bank-gt", args.v2t_bank_gt, "--v2t-bank",
                                              args.v2t_bank)):
    if value and (args.select != "bank" or bank_value == "test"):
      raise UserError(f"{flag} labels a {bank_flag} file for --select bank; use it with both "
                      f"(the test queries' labels are never used for selection)")
  _check_val_args(args)
  _check_gallery_bank_args(args, row)
  if args.plot and args.plot.lower().endswith(".png") is False:
    raise UserError(f"--plot must name a .png file, got {args.plot!r}")
  npy_files.check_new_output(args.plot, "--plot")
  npy_files.check_new_output(args.json, "--json")


def _check_val_args(args) -> None:
  """``--val*`` come with ``--select val``, and each validation bank matches the test bank."""
  given = [flag for flag, _, _ in _VALIDATION_FLAGS if getattr(args, _dest(flag))]
  if args.select != "val":
    if given:
      raise UserError(f"{given[0]} serves --select val only")
    return
  if not args.val:
    raise UserError("--select val needs --val VAL.npy (validation queries x validation gallery)")
  for bank_flag, bank, val_flag, val_bank in (
      ("--bank", args.bank, "--val-bank", args.val_bank),
      ("--v2t-bank", args.v2t_bank, "--val-v2t-bank", args.val_v2t_bank)):
    if bank != "test" and not val_bank:
      raise UserError(f"with a {bank_flag} file, --select val needs {val_flag}: the same kind of "
                      f"bank scored against the validation split (never the test one)")
    if bank == "test" and val_bank:
      raise UserError(f"{val_flag} needs a {bank_flag} file: with {bank_flag} test the "
                      f"validation queries are their own bank, as the test queries are")


def _check_gallery_bank_args(args, row) -> None:
  """Gallery-side banks are given exactly for methods that use them."""
  flags = (("--gallery-bank", "--v2t-gallery-bank") +
           (("--val-gallery-bank", "--val-v2t-gallery-bank") if args.select == "val" else ()))
  for flag in flags:
    if row.gallery_bank and not getattr(args, _dest(flag)):
      raise UserError(f"{args.method} needs {flag}: gallery-side items scored against the "
                      f"candidates (e.g. training videos x test videos for t2v; see --help)")
  for flag in ("--gallery-bank", "--v2t-gallery-bank"):
    if not row.gallery_bank and getattr(args, _dest(flag)):
      raise UserError(f"{flag} serves methods with a gallery bank (dualis), not {args.method}")


def _check_values(args) -> None:
  """The temperature and every registry option given on the command line are in range."""
  if not (np.isfinite(args.temperature) and args.temperature > 0):
    raise UserError(f"--temperature must be a positive number, got {args.temperature}")
  for name in norm_lib.method_names():
    for knob in norm_lib.normalizer(name).knobs:
      problem = knob.problem(getattr(args, _dest(knob.flag)))
      if problem:
        raise UserError(problem)


def _load_inputs(args) -> _Inputs:
  """The test matrix, its ground truth map, both banks and their label maps, checked."""
  sims = demo_matrix() if args.demo else _load_matrix(args.sims, "SIMS")
  n_texts, n_videos = sims.shape
  if args.gt:
    mapping = _load_map(args.gt, n_texts, n_videos)
  elif n_texts != n_videos:
    raise UserError(f"SIMS is {n_texts} x {n_videos}, not square, so the ground truth cannot be "
                    f"the diagonal; give --gt MAP.npy with each text's video index")
  else:
    mapping = None
  bank = _load_bank(args.bank, "--bank", n_videos,
                    f"SIMS has {n_videos} videos; the bank must score its queries against the "
                    f"same test videos")
  v2t_bank = _load_bank(args.v2t_bank, "--v2t-bank", n_texts,
                        f"SIMS has {n_texts} texts; it must score video queries against the same "
                        f"test captions")
  logit_range.check_temperature(args.temperature, *logit_range.score_range(sims, bank, v2t_bank),
                                source="the similarities (SIMS and bank files)")
  bank_gts = {
      "t2v": _load_bank_map(args.bank_gt, bank, "--bank-gt") if args.bank_gt else None,
      "v2t": _load_bank_map(args.v2t_bank_gt, v2t_bank, "--v2t-bank-gt")
             if args.v2t_bank_gt else None}
  shapes = (sims.shape if bank is None else bank.shape,
            sims.T.shape if v2t_bank is None else v2t_bank.shape)
  gallery_banks = _load_gallery_banks(args.gallery_bank, args.v2t_gallery_bank, sims.shape, "")
  val = _load_validation(args) if args.select == "val" else None
  return _Inputs(sims, mapping, bank, v2t_bank, bank_gts, shapes, gallery_banks, val)


def _load_ground_truth(path: str | None, shape: tuple, what: str) -> np.ndarray | None:
  """A text -> video map (``what``-gt), or None for the diagonal of a square matrix."""
  n_texts, n_videos = shape
  if path:
    return _load_map(path, n_texts, n_videos, f"{what}-gt")
  if n_texts != n_videos:
    raise UserError(f"{what} is {n_texts} x {n_videos}, not square, so the ground truth cannot be "
                    f"the diagonal; give a map with each text's video index")
  return None


def _load_gallery_banks(t2v: str | None, v2t: str | None, shape: tuple, prefix: str) -> dict:
  """Gallery-side banks of both directions (None where not given)."""
  n_texts, n_videos = shape
  return {
      "t2v": None if not t2v else _load_bank(
          t2v, f"--{prefix}gallery-bank", n_videos, f"the matrix has {n_videos} videos"),
      "v2t": None if not v2t else _load_bank(
          v2t, f"--{prefix}v2t-gallery-bank", n_texts, f"the matrix has {n_texts} texts")}


def _load_validation(args) -> dict:
  """The validation split's two problems (``--select val``)."""
  val = _load_matrix(args.val, "--val")
  n_texts, n_videos = val.shape
  mapping = _load_ground_truth(args.val_gt, val.shape, "--val")
  banks = {
      "t2v": None if not args.val_bank else _load_bank(
          args.val_bank, "--val-bank", n_videos, f"--val has {n_videos} videos"),
      "v2t": None if not args.val_v2t_bank else _load_bank(
          args.val_v2t_bank, "--val-v2t-bank", n_texts, f"--val has {n_texts} texts")}
  gallery_banks = _load_gallery_banks(args.val_gallery_bank, args.val_v2t_gallery_bank,
                                      val.shape, "val-")
  return _problems(val, mapping, banks, gallery_banks)


def _load_bank(value: str, flag: str, n_columns: int, expected: str) -> np.ndarray | None:
  """A bank file whose columns are the test candidates (None for ``test``)."""
  if value == "test":
    return None
  bank = _load_matrix(value, flag)
  if bank.shape[1] != n_columns:
    raise UserError(f"{flag} has {bank.shape[1]} columns but {expected}")
  return bank


def _write_outputs(args, result: dict, errors: dict, inputs: _Inputs) -> None:
  """The table (stdout, or stderr under ``--json -``), then the optional plot and JSON."""
  table = _table(args, result, errors, inputs.sims.shape, inputs.bank_shapes)
  print(table, file=sys.stderr if args.json == "-" else sys.stdout)
  if args.plot:
    before, after, expected = errors["t2v"]["mass"]
    plots.plot_mass_histograms(
        args.plot, before, after, expected,
        labels=("raw", f"{args.method} ({norm_lib.setting(args.method, args.bank == 'test')})"),
        title=f"text-to-video: summed retrieval probability per video (T={args.temperature:g})")
  if args.json:
    text = json.dumps(result, indent=2)
    if args.json == "-":
      print(text)
    else:
      npy_files.save_new_text(args.json, text + "\n")


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  _check_args(args)
  inputs = _load_inputs(args)
  result, errors = _evaluate(args, inputs)
  _write_outputs(args, result, errors, inputs)
  return 0


if __name__ == "__main__":
  run_cli(main)
