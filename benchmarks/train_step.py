"""Train-step cost of NCL against InfoNCE, and the demo config's training speed.

    python benchmarks/train_step.py [--rounds 8] [--out results.json]

1. NCL / InfoNCE step time in features mode with CLIP4Clip's sizes: global batch 128, the
   ViT-B/32 text tower (width 512, 12 layers, 32 words), 12 frames of 512-d features with the
   meanP head, queues of 16,384 entries (filled, so Sinkhorn sees 16,384 + 128 queries). Both
   losses run the same trainer (both keep the queues, which are the bank of NCL-normalized
   inference); NCL adds the Sinkhorn biases. Single steps of the two losses alternate in one
   process, so that machine load affects both alike; the ratio of the median step times and the
   median of the per-pair ratios are reported. Goal: <= 1.03. The two losses alone (value and
   gradient with respect to the embeddings) are timed too, to show the absolute overhead.
2. Steps per second of ``configs/synthetic.py`` (the demo), train step only.

Runs on whatever devices JAX sees (the 2-core CPU in the README numbers).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from ncl_jax import sharding
from ncl_jax import train
from ncl_jax.queue import Queue

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str):
  spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def features_config(loss: str, queue_size: int):
  """CLIP4Clip's sizes in features mode on the synthetic generator (no data needed)."""
  config = load_config("synthetic")
  config.loss = loss
  config.global_batch_size = 128
  config.ncl.queue_size = queue_size
  data = config.data
  data.feature_dim, data.max_words, data.max_frames = 512, 32, 12
  data.vocab_size, data.num_train_videos, data.prefetch = 49408, 1024, 0
  model = config.model
  model.feature_dim = model.embed_dim = 512
  model.max_frames = 12
  model.text.width, model.text.layers, model.text.heads = 512, 12, 8
  model.text.vocab_size, model.text.context_length = 49408, 32
  return config


def _filled(queue: Queue, key) -> Queue:
  """The queue with every slot holding a random unit embedding (same sharding)."""
  emb = jax.random.normal(key, queue.embeddings.shape, jnp.float32)
  emb = emb / jnp.linalg.norm(emb, axis=1, keepdims=True)
  return Queue(jax.device_put(emb, queue.embeddings.sharding), queue.pointer,
               jax.device_put(jnp.ones_like(queue.valid), queue.valid.sharding))


class _Stepper:
  """A compiled train step of one config with a few fixed device batches."""

  def __init__(self, config, fill_queues: bool):
    self.run = train.Run(config)
    state = self.run.initial_state()
    if fill_queues:
      state = state._replace(text_queue=_filled(state.text_queue, jax.random.PRNGKey(1)),
                             video_queue=_filled(state.video_queue, jax.random.PRNGKey(2)))
    self.state = state
    iterator = self.run.dataset.train_iterator(config.global_batch_size, seed=0)
    self.batches = [sharding.host_batch_to_global(next(iterator), self.run.mesh)
                    for _ in range(2)]
    self.i = 0
    self.compile_s = self.time(1)  # the first call compiles

  def time(self, steps: int) -> float:
    """Seconds per step over ``steps`` steps (each waited for)."""
    start = time.perf_counter()
    for _ in range(steps):
      self.state, metrics = self.run.train_step(self.state, self.batches[self.i % 2])
      self.i += 1
      jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / steps


def ncl_vs_infonce(rounds: int, queue_size: int) -> dict:
  """Alternates single steps of the two losses; medians and the median of paired ratios."""
  steppers = {loss: _Stepper(features_config(loss, queue_size), fill_queues=True)
              for loss in ("infonce", "ncl")}
  times = {loss: [] for loss in steppers}
  for _ in range(rounds):
    for loss, stepper in steppers.items():
      times[loss].append(stepper.time(1))
  med = {loss: statistics.median(t) for loss, t in times.items()}
  paired = [n / i for n, i in zip(times["ncl"], times["infonce"])]
  state = steppers["ncl"].state
  return {
      "setting": f"features mode, global batch 128, queue {queue_size}, text tower 512x12, "
                 f"{jax.device_count()} {jax.devices()[0].platform} device(s)",
      "infonce_step_s": med["infonce"],
      "ncl_step_s": med["ncl"],
      "ratio_ncl_over_infonce": med["ncl"] / med["infonce"],
      "median_paired_ratio": statistics.median(paired),
      "steps_s": times,
      "queue_valid": int(np.asarray(state.text_queue.valid).sum()),
  }


def loss_only(queue_size: int, repeats: int) -> dict:
  """The losses alone, value and gradient w.r.t. the embeddings, at the same sizes."""
  config = features_config("ncl", queue_size)
  key = jax.random.PRNGKey(0)
  unit = lambda x: x / jnp.linalg.norm(x, axis=1, keepdims=True)
  text, video = (unit(jax.random.normal(k, (128, 512))) for k in jax.random.split(key, 2))
  queues = [Queue(unit(jax.random.normal(k, (queue_size, 512))), jnp.zeros((), jnp.int32),
                  jnp.ones((queue_size,), bool)) for k in jax.random.split(key, 3)[1:]]
  fns = {}
  for loss in ("infonce", "ncl"):
    config.loss = loss
    loss_fn = train.make_loss_fn(config)
    fns[loss] = jax.jit(jax.value_and_grad(
        lambda t, v, fn=loss_fn: fn(t, v, 100.0, *queues)[0], argnums=(0, 1)))
    jax.block_until_ready(fns[loss](text, video))
  times = {loss: [] for loss in fns}
  for _ in range(repeats):
    for loss, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(text, video))
      times[loss].append(time.perf_counter() - start)
  return {f"{loss}_loss_and_grad_s": statistics.median(t) for loss, t in times.items()}


def demo_speed(steps: int) -> dict:
  config = load_config("synthetic")
  stepper = _Stepper(config, fill_queues=False)
  stepper.time(5)  # fill the queue a little and warm up
  per_step = stepper.time(steps)
  return {"demo_steps_per_s": 1.0 / per_step, "demo_compile_s": stepper.compile_s,
          "demo_total_steps": stepper.run.total_steps}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=8,
                      help="timed steps per loss, alternating between the losses")
  parser.add_argument("--queue_size", type=int, default=16384)
  parser.add_argument("--out", default=None, help="also write the numbers to this JSON file")
  args = parser.parse_args(argv)
  results = loss_only(args.queue_size, repeats=20)
  results.update(ncl_vs_infonce(args.rounds, args.queue_size))
  print(f"{results['setting']}")
  print(f"  InfoNCE step {1e3 * results['infonce_step_s']:.1f} ms, NCL step "
        f"{1e3 * results['ncl_step_s']:.1f} ms (medians), NCL / InfoNCE = "
        f"{results['ratio_ncl_over_infonce']:.3f}, median of paired ratios "
        f"{results['median_paired_ratio']:.3f} (goal <= 1.03)")
  print(f"  loss and gradient alone: InfoNCE "
        f"{1e3 * results['infonce_loss_and_grad_s']:.1f} ms, NCL "
        f"{1e3 * results['ncl_loss_and_grad_s']:.1f} ms")
  results.update(demo_speed(20))
  print(f"demo config (configs/synthetic.py): {results['demo_steps_per_s']:.1f} train steps/s, "
        f"{results['demo_total_steps']} steps per run")
  if args.out:
    path = pathlib.Path(args.out)
    if path.exists():
      print(f"error: {path} exists; choose a new --out", file=sys.stderr)
      return 2
    path.write_text(json.dumps(results, indent=2) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
