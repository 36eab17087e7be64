"""Training memory per device of the ViT-B/32, ViT-B/16 and ViT-L/14 config variants (estimate).

    python benchmarks/clip_memory.py [--variants vitb32,vitb16,vitl14] [--datasets msrvtt,activitynet]
        [--per-device-batch 16] [--out results.json]

No accelerator was available, so the device memory of a train step is estimated from parts that
are measured on the CPU:

* **state**: float32 parameters, their gradients and AdamW's two moments, 16 bytes a parameter
  (counted from the model's parameter tree);
* **saved**: what the backward pass keeps from the forward pass, per frame and per caption, as
  JAX reports it (``jax._src.ad_checkpoint.saved_residuals``) for the variant's tower with its
  dtype and remat; batch-independent residuals (the bfloat16 copy of the token table) once;
* **block**: the working set while one rematerialised block is recomputed and differentiated:
  that block's forward intermediates (the tower's residuals without remat, divided by its depth)
  and as much again for their cotangents, for every frame and caption of the batch.

Estimate = state + saved + block. Without remat, ``block`` is 0 and ``saved`` holds every
block's intermediates. The XLA CPU compiler's own buffer assignment is not used: it reports the
same temporaries with and without remat (about 45 GiB for ViT-B/16 at 16 videos x 12 frames),
so it says nothing about an accelerator compiler's schedule.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.ad_checkpoint import saved_residuals

from ncl_jax.models import clip

REPO = pathlib.Path(__file__).resolve().parents[1]
GIB, MIB = 2**30, 2**20
STATE_BYTES_PER_PARAM = 16  # float32 value, gradient, AdamW mu and nu


def load_config(dataset: str, variant: str):
  spec = importlib.util.spec_from_file_location(f"bench_{dataset}",
                                                REPO / "configs" / f"{dataset}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def _residual_bytes(tower, example, n: int) -> tuple[int, int]:
  """(bytes saved for the backward pass with n examples, number of parameters)."""
  batch = jnp.zeros((n,) + example.shape[1:], example.dtype)
  shapes = jax.eval_shape(tower.init, jax.random.key(0), batch)
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  residuals = saved_residuals(lambda p: tower.apply(p, batch).astype(jnp.float32).sum(), params)
  saved = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a, source in residuals
              if "argument" not in source)
  return saved, sum(x.size for x in jax.tree.leaves(shapes))


def per_item(tower_fn, model_config, example) -> dict:
  """Saved bytes per item (frame or caption) with and without remat, plus the fixed part."""
  out = {}
  for remat in (False, True):
    config = model_config.copy_and_resolve_references()
    config.remat = remat
    tower = tower_fn(config)
    one, params = _residual_bytes(tower, example, 1)
    two, _ = _residual_bytes(tower, example, 2)
    out[remat] = (two - one, 2 * one - two)  # (per item, batch-independent)
  return {"params": params, "per_item": out[True][0] if model_config.remat else out[False][0],
          "fixed": out[True][1] if model_config.remat else out[False][1],
          "block": (out[False][0] - out[True][0]) * 2 if model_config.remat else 0}


def estimate(dataset: str, variant: str, per_device_batch: int) -> dict:
  config = load_config(dataset, variant)
  model = config.model
  frames, words = int(config.data.max_frames), int(config.data.max_words)
  size = int(model.vision.image_size)
  vision = per_item(clip.vision_tower, model, jnp.zeros((1, size, size, 3), jnp.float32))
  text = per_item(clip.text_tower, model, jnp.ones((1, words), jnp.int32))
  n_frames, n_captions = per_device_batch * frames, per_device_batch
  state = (vision["params"] + text["params"]) * STATE_BYTES_PER_PARAM
  saved = (n_frames * vision["per_item"] + n_captions * text["per_item"] + vision["fixed"]
           + text["fixed"])
  block = max(n_frames * vision["block"] // int(model.vision.layers),
              n_captions * text["block"] // int(model.text.layers))
  return {"dataset": dataset, "variant": variant, "per_device_batch": per_device_batch,
          "frames": frames, "dtype": model.dtype, "remat": bool(model.remat),
          "params_millions": round((vision["params"] + text["params"]) / 1e6, 1),
          "saved_mib_per_frame": round(vision["per_item"] / MIB, 2),
          "state_gib": round(state / GIB, 2), "saved_gib": round(saved / GIB, 2),
          "block_gib": round(block / GIB, 2),
          "estimate_gib": round((state + saved + block) / GIB, 1)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variants", default="vitb32,vitb16,vitl14")
  parser.add_argument("--datasets", default="msrvtt,activitynet")
  parser.add_argument("--per-device-batch", type=int, default=16)
  parser.add_argument("--out", default=None, help="also write the rows as JSON here")
  args = parser.parse_args()
  rows = []
  for dataset in args.datasets.split(","):
    for variant in args.variants.split(","):
      rows.append(estimate(dataset, variant, args.per_device_batch))
      print(json.dumps(rows[-1]), flush=True)
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
  main()
