"""Device memory of one training step for the ViT-B/32, ViT-B/16 and ViT-L/14 config variants.

    python benchmarks/clip_memory.py [--variants vitb32,vitb16,vitl14] [--datasets msrvtt]
        [--per-device-batch 16] [--out results.json]

For each ``configs/<dataset>.py:<variant>`` (CLIP4Clip's words and frames, the variant's dtype
and remat, NCL's queues of 16,384 entries) the trainer's own jitted, data-parallel train step is
compiled for one device holding ``--per-device-batch`` videos (CLIP4Clip's global batch of 128
on 8 devices is 16 per device), and XLA's buffer assignment is read back
(``compiled.memory_analysis()``): arguments (the train state and the batch), outputs (the new
state, which reuses the donated old one) and temporaries. Nothing runs, so no accelerator is
needed; the numbers are the compiling backend's (the CPU here), and a GPU or TPU compiler fuses
and schedules differently, so read them as estimates within tens of percent.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import pathlib
import time

import jax
import jax.numpy as jnp

from ncl_jax import sharding, train
from ncl_jax.models import dual_encoder
from ncl_jax.train_state import make_optimizer

REPO = pathlib.Path(__file__).resolve().parents[1]
GIB = 2**30


def load_config(dataset: str, variant: str):
  spec = importlib.util.spec_from_file_location(f"bench_{dataset}",
                                                REPO / "configs" / f"{dataset}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def step_memory(dataset: str, variant: str, per_device_batch: int) -> dict:
  """Compiles one train step on one device; returns XLA's memory figures in GiB."""
  config = load_config(dataset, variant)
  config.global_batch_size = per_device_batch
  model = dual_encoder.DualEncoder(config.model)
  abstract_params = jax.eval_shape(functools.partial(train.init_params, model), config.seed)
  labels = dual_encoder.param_labels(abstract_params, config.model, pretrained=True)
  tx, schedules = make_optimizer(config.optimizer, labels, total_steps=1000)
  abstract_state = jax.eval_shape(
      lambda p: train.new_train_state(p, tx, int(config.ncl.queue_size),
                                      int(config.model.embed_dim), 0), abstract_params)
  frames, size = int(config.data.max_frames), int(config.model.vision.image_size)
  batch = {
      "text_tokens": jax.ShapeDtypeStruct((per_device_batch, int(config.data.max_words)),
                                          jnp.int32),
      "video": jax.ShapeDtypeStruct((per_device_batch, frames, size, size, 3), jnp.uint8),
      "frame_mask": jax.ShapeDtypeStruct((per_device_batch, frames), jnp.bool_),
  }
  mesh = sharding.make_mesh(jax.devices()[:1])
  step = train.make_train_step(model, train.make_loss_fn(config), tx, mesh, schedules)
  start = time.perf_counter()
  compiled = step.lower(abstract_state, batch).compile()
  analysis = compiled.memory_analysis()
  params = sum(x.size for x in jax.tree.leaves(abstract_params))
  args = analysis.argument_size_in_bytes
  temp = analysis.temp_size_in_bytes
  # The donated state aliases the new one, so the peak is arguments + temporaries + whatever
  # output is not an alias.
  out_extra = analysis.output_size_in_bytes - analysis.alias_size_in_bytes
  return {"dataset": dataset, "variant": variant, "per_device_batch": per_device_batch,
          "frames": frames, "dtype": config.model.dtype, "remat": bool(config.model.remat),
          "params_millions": round(params / 1e6, 1),
          "arguments_gib": round(args / GIB, 2), "temporaries_gib": round(temp / GIB, 2),
          "peak_estimate_gib": round((args + temp + max(out_extra, 0)) / GIB, 2),
          "compile_s": round(time.perf_counter() - start, 1)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variants", default="vitb32,vitb16,vitl14")
  parser.add_argument("--datasets", default="msrvtt")
  parser.add_argument("--per-device-batch", type=int, default=16)
  parser.add_argument("--out", default=None, help="also write the rows as JSON here")
  args = parser.parse_args()
  rows = []
  for dataset in args.datasets.split(","):
    for variant in args.variants.split(","):
      row = step_memory(dataset, variant, args.per_device_batch)
      rows.append(row)
      print(json.dumps(row), flush=True)
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
  main()
