"""Builds a real data set for ncl_jax from the files CLIP4Clip's instructions download.

Usage:
  python -m ncl_jax.data.prepare DATASET --manual_dir DIR [--videos_dir DIR] \
      [--features_dir DIR] --data_dir OUT [--max_bad_fraction F] \
      [--num_workers N] [--beam_runner NAME --beam_options="..."]

DATASET is one of msrvtt, msvd, activitynet, didemo, or the image-text sets coco and flickr30k
(``ncl_jax.data.image_text``: --videos_dir is then the image folder). Frames mode (the default) decodes the
videos; passing --features_dir (or --mode features) stores per-frame features instead. The
command shows progress while it decodes, prints a readable summary, and ends with one JSON line
``{"dataset": ..., "splits": {"train": {"videos": n, "captions": m}, ...}, "skipped_videos": k,
"ids_without_captions": j}`` (j: ids a split list names but its caption file lacks; they are
left out, never a failure).
``--num_workers N`` (N > 1) loads the videos in N processes with Apache Beam's DirectRunner;
``--beam_runner``/``--beam_options`` run the same build on another Beam runner (Dataflow,
Flink, Spark). Training then reads it with ``--config.data.data_dir=OUT``. An existing
prepared copy in OUT is reused, never overwritten.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys

import tensorflow_datasets as tfds

from ncl_jax.data import builders, image_text
from ncl_jax.errors import UserError, run_cli


def _all_builders() -> dict:
  """The video builders plus the image-text ones (COCO, Flickr30k; ncl_jax.data.image_text)."""
  return {**builders.BUILDERS, **image_text.BUILDERS}


def _parser() -> argparse.ArgumentParser:
  BUILDERS = _all_builders()  # pylint: disable=invalid-name
  epilog = "\n".join(f"--- {name} ---{cls.MANUAL_DOWNLOAD_INSTRUCTIONS}"
                     for name, cls in BUILDERS.items())
  parser = _OneLineErrors(
      prog="python -m ncl_jax.data.prepare", description=__doc__.split("\n\n")[0],
      epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("dataset", choices=sorted(BUILDERS))
  parser.add_argument("--manual_dir", required=True, help="folder with the annotation files")
  parser.add_argument("--data_dir", required=True, help="output folder (TFDS layout)")
  parser.add_argument("--videos_dir", help="video folder (default: MANUAL_DIR/videos)")
  parser.add_argument("--features_dir", help="folder of <video>.npy [T, D] feature files")
  parser.add_argument("--mode", choices=("frames", "features"),
                      help="default: features if --features_dir is given, else frames")
  parser.add_argument("--max_frames", type=int,
                      help="frames kept per video (default: 12 for MSR-VTT/MSVD, 64 otherwise)")
  parser.add_argument("--image_size", type=int, default=224, help="frame side after the crop")
  parser.add_argument("--fps", type=float, default=1.0, help="frames sampled per second")
  parser.add_argument("--jpeg_quality", type=int, default=95)
  parser.add_argument("--frame_format", choices=("jpeg", "raw"), default="jpeg",
                      help="how frames are stored: jpeg (default), or raw uint8 pixels, which "
                           "training reads without decoding (147 KiB a 224 px frame, 1.7 MiB "
                           "a 12-frame video: see docs/data.md for the disk cost)")
  parser.add_argument("--max_bad_fraction", type=float, default=0.01,
                      help="fail when a larger fraction of a split's videos is missing or bad")
  parser.add_argument("--num_workers", type=int, default=1,
                      help="processes loading videos: 1 = in this process (with --threads "
                           "threads); N > 1 = Apache Beam's DirectRunner with N worker "
                           "processes (pip install 'ncl_jax[beam]')")
  parser.add_argument("--threads", type=int, default=2,
                      help="decoding threads of the in-process build (--num_workers 1)")
  parser.add_argument("--decoder_threads", type=int, default=0,
                      help="FFmpeg threads that decode one video; 0 (default) = this host's "
                           "cores divided by the videos decoded at once (--threads in process, "
                           "--num_workers with the DirectRunner), or FFmpeg's own choice on "
                           "other Beam runners")
  parser.add_argument("--beam_runner",
                      help="build with this Apache Beam runner (e.g. DataflowRunner, "
                           "FlinkRunner, SparkRunner; default DirectRunner when Beam is used)")
  parser.add_argument("--beam_options", default="",
                      help="the Beam pipeline options, one shell-quoted string passed through "
                           "unchanged; write it with '=': "
                           "--beam_options=\"--project=P --region=R\"")
  return parser


class _OneLineErrors(argparse.ArgumentParser):
  """argparse, but a bad argument is a UserError: one `error: ...` line, exit 2."""

  def error(self, message):
    raise UserError(f"{message} (see `python -m ncl_jax.data.prepare --help`)")


def _beam_settings(args: argparse.Namespace):
  """(runner, options) when the build uses Apache Beam, else None (the in-process build)."""
  if args.num_workers < 1:
    raise UserError(f"--num_workers must be at least 1 (got {args.num_workers}); 1 builds in "
                    "this process, N > 1 with N Beam worker processes")
  if args.threads < 1:
    raise UserError(f"--threads must be at least 1 (got {args.threads})")
  if args.decoder_threads < 0:
    raise UserError(f"--decoder_threads must be 0 (automatic) or more (got "
                    f"{args.decoder_threads})")
  if args.num_workers == 1 and not args.beam_runner and not args.beam_options:
    return None
  try:
    from ncl_jax.data import beam_prepare  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise UserError(f"--num_workers > 1, --beam_runner and --beam_options build with Apache "
                    f"Beam, which is not installed ({err}): pip install 'ncl_jax[beam]', or "
                    "use --num_workers 1") from err
  return beam_prepare.pipeline_settings(args.num_workers, args.beam_runner, args.beam_options)


def _host_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:   # not on Linux
    return os.cpu_count() or 1


def decoder_threads(args: argparse.Namespace, beam_settings) -> int:
  """FFmpeg threads per video: --decoder_threads, or when 0 the host's cores shared by the videos
  decoded at once (--threads in process; the DirectRunner's worker processes with Beam), so that
  N decoders do not each start a thread per core (which made 2 Beam workers on 2 cores only
  1.4x as fast as 1). On a remote runner the workers' cores are not known here: 0 leaves the
  choice to FFmpeg.

  Args:
    args: the parsed command line.
    beam_settings: (runner, options) of :func:`_beam_settings`, or None in process.
  """
  if args.decoder_threads:
    return args.decoder_threads
  if beam_settings is None:
    return max(1, _host_cores() // args.threads)
  from ncl_jax.data import beam_prepare  # pylint: disable=g-import-not-at-top
  workers = beam_prepare.local_worker_count(*beam_settings)
  return 0 if workers is None else max(1, _host_cores() // workers)


def prepare(args: argparse.Namespace) -> dict:
  """Builds (or reuses) the prepared data set and returns the summary dict. ``args`` may omit
  options: they take the command line's defaults."""
  if not sys.stderr.isatty():
    # TFDS's progress bars redraw with carriage returns: debris in a log file or a pipe. The
    # command's own summary and the Beam workers' progress lines still say what happened.
    tfds.disable_progress_bar()

  defaults = {a.dest: a.default for a in _parser()._actions  # pylint: disable=protected-access
              if a.dest != "help"}
  args = argparse.Namespace(**{**defaults, **vars(args)})

  if not os.path.isdir(args.manual_dir):
    raise UserError(f"--manual_dir {args.manual_dir} is not a folder; see "
                    "`python -m ncl_jax.data.prepare --help` for the files it must hold")
  mode = args.mode or ("features" if args.features_dir else "frames")
  max_frames = args.max_frames or builders.DEFAULT_MAX_FRAMES.get(args.dataset, 1)
  if max_frames < 1 or args.image_size < 1 or args.fps <= 0:
    raise UserError("--max_frames, --image_size and --fps must be positive")
  if not 0 <= args.max_bad_fraction <= 1:
    raise UserError("--max_bad_fraction must be in [0, 1]")
  beam_settings = _beam_settings(args)
  config = builders.make_config(mode, max_frames, args.image_size, args.fps, args.jpeg_quality,
                                args.frame_format if mode == "frames" else "jpeg")
  builder_cls = _all_builders()[args.dataset]
  # TFDS refuses a new config object named like a built-in one: pass the built-in by name.
  if config.name in builder_cls.builder_configs:
    config = config.name
  builder = builder_cls(
      data_dir=args.data_dir, config=config, file_format="array_record",
      videos_dir=args.videos_dir, features_dir=args.features_dir,
      max_bad_fraction=args.max_bad_fraction, num_workers=args.threads,
      beam=beam_settings is not None,
      decoder_threads=decoder_threads(args, beam_settings))
  runner, options = beam_settings or (None, None)
  reused = builder.is_prepared()
  with _quiet_beam() if beam_settings else contextlib.nullcontext(), \
      _removed_on_failure(args.data_dir):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=args.manual_dir, beam_runner=runner, beam_options=options))
  return dict(summarize(args.dataset, builder), reused=reused)


def _paths_under(root: str) -> set[str]:
  """Every file and folder under ``root`` (``root`` included when it exists)."""
  if not os.path.exists(root):
    return set()
  found = {os.path.abspath(root)}
  for folder, subfolders, files in os.walk(root):
    found.update(os.path.abspath(os.path.join(folder, name)) for name in subfolders + files)
  return found


@contextlib.contextmanager
def _removed_on_failure(data_dir: str):
  """Deletes what a failing build created under ``data_dir`` (TFDS leaves its config record and
  empty folders behind), so that a failed ``prepare`` leaves the folder as it found it."""
  before = _paths_under(data_dir)
  try:
    yield
  except BaseException:
    # Deepest first, so that folders are empty when their turn comes.
    for path in sorted(_paths_under(data_dir) - before, key=len, reverse=True):
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        with contextlib.suppress(FileNotFoundError):
          os.remove(path)
    raise


def _quiet_beam():
  from ncl_jax.data import beam_prepare  # pylint: disable=g-import-not-at-top
  return beam_prepare.quiet_beam_logs()


def summarize(dataset: str, builder) -> dict:
  """{"dataset", "splits": {split: {"videos", "captions"}}, "skipped_videos",
  "ids_without_captions", ...} from the prepared copy's metadata."""
  meta = builder.info.metadata
  splits = {name: {"videos": len(info["video_ids"]),
                   "captions": sum(len(c) for c in info["captions"])}
            for name, info in meta["splits"].items()}
  skipped = {name: items for name, items in meta["skipped"].items()}
  # Copies prepared before these were recorded lack the keys.
  without = dict(meta.get("without_captions", {}))
  several = dict(meta.get("several_files", {}))
  return {"dataset": dataset, "splits": splits,
          "skipped_videos": sum(len(v) for v in skipped.values()),
          "ids_without_captions": sum(len(v) for v in without.values()),
          "config": builder.builder_config.name, "path": os.fspath(builder.data_dir),
          "skipped": skipped, "without_captions": without, "several_files": several,
          "loading": builder.loading_stats()}


def _print_summary(summary: dict) -> None:
  if summary.get("reused"):
    print(f"\n{summary['dataset']} ({summary['config']}): reused the copy prepared earlier in "
          f"{summary['path']}; nothing was rebuilt and the videos or features were not read. "
          "To rebuild it, delete that folder or give a new --data_dir.")
  else:
    print(f"\n{summary['dataset']} ({summary['config']}) written to {summary['path']}")
  for name, counts in summary["splits"].items():
    print(f"  {name:>6}: {counts['videos']:6d} videos, {counts['captions']:7d} captions, "
          f"{len(summary['skipped'][name])} skipped")
  for name, ids in summary["without_captions"].items():
    if ids:
      more = f" and {len(ids) - 5} more" if len(ids) > 5 else ""
      print(f"  {len(ids)} ids of the {name} list have no captions and were left out: "
            f"{', '.join(ids[:5])}{more}")
  for name, items in summary["several_files"].items():
    if items:
      video_id, path = items[0]
      print(f"  {len(items)} {name} videos match several files; the first by the matching "
            f"rules (docs/data.md) was used, e.g. {video_id} -> {path}")
  loading = summary["loading"]
  if loading:
    print(f"  loaded {loading['items']} {loading['noun']} in {loading['seconds']:.1f} s "
          f"({loading['items_per_s']:.2f}/s, {loading['processes']} process"
          f"{'es' if loading['processes'] > 1 else ''})")
  for name, items in summary["skipped"].items():
    for video_id, reason in items[:5]:
      print(f"  skipped ({name}) {video_id}: {reason}")
    if len(items) > 5:
      print(f"  ... and {len(items) - 5} more skipped in {name}")
  line = {k: summary[k] for k in ("dataset", "splits", "skipped_videos", "ids_without_captions")}
  print(json.dumps(line), flush=True)


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
  _print_summary(prepare(args))
  return 0


if __name__ == "__main__":
  run_cli(main)
