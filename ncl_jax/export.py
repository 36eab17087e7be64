"""Inference bundles from training runs, and their verification.

``python tools/export.py --workdir RUN --out BUNDLE [--verify]`` calls :func:`export_bundle`
(and :func:`verify_bundle`). A bundle folder holds::

  manifest.json              format, JAX/jaxlib versions, source run and step, input shapes,
                             temperature, bank sizes, platforms of the exported functions
  config.json                the run's full config (model, data, eval settings)
  params/                    encoder parameters (orbax), restored without model code
  bank.npz                   text_bank [n_t, E], video_bank [n_v, E]: the training query queues
                             at the exported step, the bank of NCL-normalized inference
  embed_text.jax_exported    jax.export serialization of (params, tokens int32 [b, L]) -> [b, E]
  embed_video.jax_exported   (params, video [b, T, ...], frame_mask bool [b, T]) -> [b, E]
  bpe_simple_vocab_16e6.txt.gz   CLIP's tokenizer vocabulary (real data sets only)
  synthetic_vocab.txt        the synthetic set's words, line i naming token id i (synthetic only)

The exported functions are polymorphic in the batch size ``b`` and lowered for CPU, CUDA and TPU.
They are StableHLO for **deployment, not archival**: a later JAX may refuse to load them (JAX
only guarantees a limited compatibility window), so the orbax parameters plus the config are
the durable copy; :func:`ncl_jax.inference.load_bundle` uses them by default.

The exported step is the one the run evaluated on its test split (``results.json``'s
``selected_step``: the best validation checkpoint), so a bundle reproduces the reported numbers.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax import export as jax_export

from ncl_jax import evaluate
from ncl_jax import inference
from ncl_jax import runs
from ncl_jax import sharding
from ncl_jax import tokenizer
from ncl_jax.data import get_dataset
from ncl_jax.data import synthetic
from ncl_jax.errors import UserError
from ncl_jax.models.dual_encoder import DualEncoder

PLATFORMS = ("cpu", "cuda", "tpu")
# Verification thresholds: embeddings through the exported functions vs the training code path,
# and metric equality (R@K are percentages of counts, MdR/MnR ranks: equal up to float noise).
EMBEDDING_TOLERANCE = 1e-5
METRIC_TOLERANCE = 1e-9
DEPLOYMENT_NOTE = ("embed_*.jax_exported are jax.export serializations for deployment, not "
                   "archival: newer JAX releases may refuse them. params/ + config.json are the "
                   "durable copy.")


def exported_functions(config: ml_collections.ConfigDict, params: Any,
                       platforms=PLATFORMS):
  """``jax.export`` of the text and video embedding functions, batch size symbolic.

  They are the training evaluation's own jitted encoders (:func:`ncl_jax.evaluate.make_encoders`),
  so exported and training-time embeddings come from the same code.
  """
  encoders = evaluate.make_encoders(DualEncoder(config.model))
  param_specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  (batch,) = jax_export.symbolic_shape("b")
  video_shape, video_dtype = inference.video_input_shape(config)
  tokens = jax.ShapeDtypeStruct((batch, int(config.data.max_words)), jnp.int32)
  video = jax.ShapeDtypeStruct((batch,) + tuple(video_shape), video_dtype)
  mask = jax.ShapeDtypeStruct((batch, video_shape[0]), jnp.bool_)
  text_exp = jax_export.export(encoders.text, platforms=platforms)(param_specs, tokens)
  video_exp = jax_export.export(encoders.video, platforms=platforms)(param_specs, video, mask)
  return text_exp, video_exp


def _save_params(path: pathlib.Path, params: Any) -> None:
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path.resolve(), params)
  checkpointer.wait_until_finished()
  checkpointer.close()


def export_bundle(workdir: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None,
                  platforms=PLATFORMS) -> dict:
  """Writes an inference bundle of a run's selected checkpoint to ``out``; returns its manifest.

  The bundle is assembled in a temporary folder beside ``out`` and renamed at the end, so a
  failure never leaves a half-written bundle.

  Raises:
    UserError: ``out`` exists (nothing is overwritten), or ``workdir`` is not a usable run.
  """
  out = pathlib.Path(out).expanduser()
  if out.exists():
    raise UserError(f"--out {out} already exists; choose a new folder (bundles are never "
                    "overwritten)")
  run = runs.restore_run(workdir, step)
  vocab = runs.find_vocabulary(run.config)
  text_exp, video_exp = exported_functions(run.config, run.params, platforms)
  manifest = _manifest(workdir, run, text_exp, vocab)
  tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
  if tmp.exists():
    shutil.rmtree(tmp)  # our own leftover from a crashed export of this process id
  tmp.mkdir(parents=True)
  try:
    _write_bundle(tmp, run, manifest, text_exp, video_exp, vocab)
    if out.exists():
      raise UserError(f"--out {out} appeared while exporting; nothing was overwritten")
    os.rename(tmp, out)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)
  return manifest


def _manifest(workdir, run: runs.RunCheckpoint, text_exp, vocab: pathlib.Path | None) -> dict:
  """The bundle's manifest.json: versions, source, input shapes, temperature, bank sizes."""
  config = run.config
  video_shape, video_dtype = inference.video_input_shape(config)
  logit_scale = float(np.exp(np.asarray(jax.device_get(run.params["logit_scale"]), np.float64)))
  return {
      "format": runs.BUNDLE_FORMAT,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "jax_version": jax.__version__,
      "jaxlib_version": jaxlib.__version__,
      "workdir": str(pathlib.Path(workdir).expanduser().resolve()),
      "step": run.step,
      "selected_on": (run.results or {}).get("selected_on"),
      "loss": config.loss,
      "dataset": config.data.name,
      "input_mode": config.model.input_mode,
      "embed_dim": int(config.model.embed_dim),
      "text_input": {"shape": ["b", int(config.data.max_words)], "dtype": "int32"},
      "video_input": {"shape": ["b", *map(int, video_shape)], "dtype": np.dtype(video_dtype).name},
      "frame_mask_input": {"shape": ["b", int(video_shape[0])], "dtype": "bool"},
      "logit_scale": logit_scale,
      "bank_size": {"text": int(len(run.text_bank)), "video": int(len(run.video_bank))},
      "exported": {"text": runs.TEXT_FN_FILE, "video": runs.VIDEO_FN_FILE,
                   "platforms": list(text_exp.platforms),
                   "calling_convention_version": int(text_exp.calling_convention_version)},
      "tokenizer": _tokenizer_name(config, vocab),
      "note": DEPLOYMENT_NOTE,
      "temperature": 1.0 / logit_scale,
  }


def _tokenizer_name(config: ml_collections.ConfigDict, vocab: pathlib.Path | None) -> str | None:
  """The tokenizer file the bundle holds (manifest.json's "tokenizer"), None for token ids."""
  if config.data.name == "synthetic":
    return runs.SYNTHETIC_VOCAB_FILE
  return vocab.name if vocab else None


def _write_tokenizer(folder: pathlib.Path, config: ml_collections.ConfigDict,
                     vocab: pathlib.Path | None) -> None:
  """Copies the run's tokenizer into the bundle. The synthetic set's is its word list, so
  ``embed_texts(["c0_1 a17 w3"])`` works on a demo bundle."""
  if config.data.name == "synthetic":
    synthetic.SyntheticVocabulary(config.data).save(folder / runs.SYNTHETIC_VOCAB_FILE)
  elif vocab:  # one file, or Hugging Face's vocab.json + merges.txt pair
    for path in tokenizer.vocab_files(vocab):
      shutil.copyfile(path, folder / path.name)


def _write_bundle(folder: pathlib.Path, run: runs.RunCheckpoint, manifest: dict, text_exp,
                  video_exp, vocab: pathlib.Path | None) -> None:
  """Writes every file of a bundle into ``folder`` (the temporary one; the manifest last)."""
  _save_params(folder / runs.PARAMS_DIR, run.params)
  np.savez(folder / runs.BANK_FILE, text_bank=run.text_bank, video_bank=run.video_bank)
  (folder / runs.TEXT_FN_FILE).write_bytes(text_exp.serialize())
  (folder / runs.VIDEO_FN_FILE).write_bytes(video_exp.serialize())
  _write_tokenizer(folder, run.config, vocab)
  config_json = json.dumps(run.config.to_dict(), indent=2) + "\n"
  (folder / runs.BUNDLE_CONFIG_FILE).write_text(config_json)
  (folder / runs.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def _training_embeddings(run: runs.RunCheckpoint, eval_data, batch_size: int):
  """The split's embeddings through the run's jitted encoders, as the trainer's evaluation ran
  them: in the trainer's layout when the batch splits over this machine's devices, else on one
  device (embeddings are per row, so the layout changes them by float rounding at most)."""
  devices = jax.devices()
  mesh = sharding.make_mesh(devices if batch_size % len(devices) == 0 else devices[:1])
  encoders = evaluate.make_encoders(DualEncoder(run.config.model))
  params = sharding.put_replicated(jax.device_get(run.params), mesh)  # as the trainer holds them
  return evaluate.encode_split(encoders, params, eval_data, mesh, batch_size)


def _metrics_equal(a: dict, b: dict) -> bool:
  return set(a) == set(b) and all(abs(float(a[k]) - float(b[k])) <= METRIC_TOLERANCE for k in a)


def verify_bundle(workdir: str | os.PathLike, bundle_dir: str | os.PathLike) -> dict:
  """Re-embeds the run's evaluation split through the bundle's exported functions.

  Verified when (1) the recomputed plain metrics equal the run's ``results.json`` in both
  directions and (2) the embeddings agree with the training code path (the run's jitted
  encoders on the same checkpoint, as the trainer's evaluation ran them) within
  :data:`EMBEDDING_TOLERANCE`.

  Returns:
    ``{"verified": bool, "t2v": {...}, "v2t": {...}, "split", "step", "ncl": {"t2v", "v2t"},
    "ncl_matches_results": bool, "max_abs_diff": {"text", "video"}}`` with the recomputed
    plain metrics under "t2v"/"v2t".

  Raises:
    UserError: the run has no results.json, or its data cannot be opened.
  """
  results = runs.read_results(workdir)
  if results is None:
    raise UserError(f"--verify needs {pathlib.Path(workdir) / runs.RESULTS_FILE}, which a "
                    "finished run writes; let the run finish (or export without --verify)")
  bundle = inference.load_bundle(bundle_dir, backend="exported")
  run = runs.restore_run(workdir, int(bundle.manifest["step"]))
  config = run.config
  dataset = get_dataset(config.data, bundle.tokenizer)
  split = results.get("split", dataset.eval_splits[-1])
  eval_data = dataset.eval_data(split)
  batch_size = int(config.eval.batch_size)

  train_text, train_video = _training_embeddings(run, eval_data, batch_size)
  text, video = inference.embed_split(bundle, eval_data, batch_size)
  diffs = {"text": float(np.abs(text - train_text).max()),
           "video": float(np.abs(video - train_video).max())}
  recomputed = evaluate.retrieval_results(
      text, video, eval_data.caption_to_video, logit_scale=bundle.logit_scale,
      text_bank=bundle.text_bank, video_bank=bundle.video_bank, eval_config=config.eval)
  expected = results["eval"]
  plain_equal = all(_metrics_equal(recomputed["plain"][d], expected["plain"][d])
                    for d in ("t2v", "v2t"))
  ncl_equal = all(_metrics_equal(recomputed["ncl"][d], expected["ncl"][d])
                  for d in ("t2v", "v2t"))
  verified = plain_equal and max(diffs.values()) <= EMBEDDING_TOLERANCE
  return {"verified": bool(verified), "t2v": recomputed["plain"]["t2v"],
          "v2t": recomputed["plain"]["v2t"], "split": split, "step": run.step,
          "ncl": recomputed["ncl"], "ncl_matches_results": bool(ncl_equal),
          "max_abs_diff": diffs}
