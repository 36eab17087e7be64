"""The train state pytree and CLIP4Clip's optimiser (AdamW, two learning rates, warmup-cosine).

The state is a plain NamedTuple of arrays so that orbax saves and restores it without custom
handlers and ``jax.eval_shape`` gives its abstract form. It holds everything a bit-exact resume
needs except the data iterator position, which travels in the checkpoint's JSON ``extra``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ncl_jax import errors
from ncl_jax.queue import Queue

# CLIP4Clip clamps the learnable log inverse temperature at ln(100) after every step (tau >= 0.01).
MAX_LOG_LOGIT_SCALE = math.log(100.0)
LOGIT_SCALE_NAME = "logit_scale"


class TrainState(NamedTuple):
  """Everything that changes during training.

  Attributes:
    step: int32 scalar, number of optimiser steps taken.
    params: the model's parameter tree.
    opt_state: optax state of :func:`make_optimizer`'s transformation.
    text_queue: :class:`~ncl_jax.queue.Queue` of recent training text embeddings [capacity, d]
      (the queries of text-to-video normalization, and the test-time bank).
    video_queue: the same for video embeddings (queries of video-to-text normalization).
    rng: uint32[2] raw PRNG key; the step's key is ``fold_in(rng, step)``.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  text_queue: Queue
  video_queue: Queue
  rng: jax.Array


def clip4clip_warmup_cosine(peak: float, total_steps: int, warmup_fraction: float
                            ) -> optax.Schedule:
  """CLIP4Clip's ``warmup_cosine`` learning-rate schedule (its BertAdam), as an optax schedule.

  With progress ``x = count / total_steps``: ``peak * x / warmup`` while ``x < warmup``, then
  ``peak * 0.5 * (1 + cos(pi * x))``. The cosine runs over the whole run, not only the part after
  warm-up, exactly as CLIP4Clip's code does (so it starts at ~0.976 * peak for warmup 0.1); this
  differs from ``optax.warmup_cosine_decay_schedule``.

  Args:
    peak: the learning rate at the end of warm-up.
    total_steps: the run's length in optimiser steps (> 0).
    warmup_fraction: fraction of the run spent warming up, in [0, 1).

  Returns:
    A function from the int update count to the float32 learning rate.
  """
  if total_steps <= 0:
    errors.fail(f"total_steps must be positive for the schedule, got {total_steps}")
  if not 0.0 <= warmup_fraction < 1.0:
    errors.fail(f"optimizer.warmup_fraction must be in [0, 1), got {warmup_fraction}")

  def schedule(count):
    x = jnp.asarray(count, jnp.float32) / total_steps
    warm = x / warmup_fraction if warmup_fraction > 0 else jnp.ones_like(x)
    cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * x))
    return peak * jnp.where(x < warmup_fraction, warm, cosine)

  return schedule


def _path_names(path) -> list[str]:
  names = []
  for entry in path:
    key = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))
    names.append(str(key).lower())
  return names


def is_decayed(path, leaf) -> bool:
  """Whether weight decay applies to a parameter (CLIP4Clip: not to biases and norms).

  Decayed: weight matrices and kernels (``ndim >= 2``). Not decayed: biases and norm scales
  (1-D), token/positional/class embeddings, and the logit scale.
  """
  names = _path_names(path)
  if getattr(leaf, "ndim", 0) < 2:
    return False
  return not any("embed" in n or "norm" in n or n == LOGIT_SCALE_NAME for n in names)


def decay_mask(params: Any) -> Any:
  """A bool tree like ``params``: True where :func:`is_decayed`."""
  return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(opt_config, param_labels: Any, total_steps: int
                   ) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
  """CLIP4Clip's optimiser: grad-norm clipping, then AdamW with two learning rates.

  Args:
    opt_config: ``config.optimizer`` (``lr``, ``clip_lr_coef``, ``warmup_fraction``, ``b1``,
      ``b2``, ``eps``, ``weight_decay``, ``grad_clip_norm``).
    param_labels: tree like the params with "clip" (pretrained CLIP weights: lr * clip_lr_coef),
      "new" (weights CLIP does not have: lr) or "frozen" (no update) at each leaf.
    total_steps: the run's length, for the schedule.

  Returns:
    ``(transformation, {"new": schedule, "clip": schedule})``.
  """
  labels = set(jax.tree.leaves(param_labels))
  unknown = labels - {"clip", "new", "frozen"}
  if unknown:
    errors.fail(f"unknown parameter labels {sorted(unknown)}; expected clip, new or frozen")
  schedules = {
      "new": clip4clip_warmup_cosine(opt_config.lr, total_steps, opt_config.warmup_fraction),
      "clip": clip4clip_warmup_cosine(opt_config.lr * opt_config.clip_lr_coef, total_steps,
                                      opt_config.warmup_fraction),
  }

  def adamw(schedule):
    return optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
                       weight_decay=opt_config.weight_decay, mask=decay_mask)

  frozen_to_zero = optax.multi_transform(
      {"clip": optax.identity(), "new": optax.identity(), "frozen": optax.set_to_zero()},
      param_labels)
  update = optax.multi_transform(
      {"clip": adamw(schedules["clip"]), "new": adamw(schedules["new"]),
       "frozen": optax.set_to_zero()}, param_labels)
  transforms = [frozen_to_zero]  # frozen gradients must not count towards the clipping norm
  if opt_config.grad_clip_norm > 0:
    transforms.append(optax.clip_by_global_norm(opt_config.grad_clip_norm))
  transforms.append(update)
  return optax.chain(*transforms), schedules


def clamp_logit_scale(params: Any, max_value: float = MAX_LOG_LOGIT_SCALE) -> Any:
  """Clamps every parameter named ``logit_scale`` (a log inverse temperature) at ``max_value``."""

  def clamp(path, leaf):
    if _path_names(path)[-1:] == [LOGIT_SCALE_NAME]:
      return jnp.minimum(leaf, max_value)
    return leaf

  return jax.tree_util.tree_map_with_path(clamp, params)


def leaf_paths(params: Any, predicate: Callable[[Any, Any], bool]) -> list[str]:
  """'/'-joined paths of the leaves where ``predicate(path, leaf)`` holds (for logs and tests)."""
  found = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if predicate(path, leaf):
      found.append("/".join(_path_names(path)))
  return found
