"""The training job: data-parallel train step with sharded NCL queues, the loop, evaluation, logs.

``train_and_evaluate(config, workdir)`` is the whole job; ``ncl_jax.main`` is a thin command-line
wrapper around it.

The train step is written per device with named-axis collectives and mapped over the 1-D mesh
(axis ``"data"``, see :mod:`ncl_jax.sharding`) with ``jax.shard_map``:

* each device encodes its local batch, then ``all_gather``s both modalities (and both query
  queues) so that the contrastive logits and the Sinkhorn problem see the *global* batch and
  the whole queue; every device then computes the same global loss. This is exact: the result
  does not depend on the number of devices (a test checks 1 against 4).
* gradients: the transpose of ``all_gather`` is ``psum_scatter``, so on each device the
  gradient of the (identical) global loss L reaches the local encoder outputs as the *sum* of the
  n devices' cotangents, i.e. ``n * dL/d(local rows)``; the local parameter gradient is thus n
  times the local batch's share of ``dL/dparams``, and ``pmean`` over devices gives exactly
  ``dL/dparams`` on every device: the data-parallel average of the pmap model. (The map runs
  with ``check_vma=False``: the math modules, Sinkhorn's ``while_loop`` in particular, are
  written with single-device semantics and do not annotate device-varying loop carries. With
  ``check_vma=True`` autodiff would also psum the parameter gradients itself.)
* the queues are sharded: each device holds ``queue_size / n`` slots of each ring buffer and
  writes its local batch into its own slice after the loss. The pointer advances by the static
  local batch size, so it stays identical on every device without communication. With
  ``queue_size`` a multiple of the global batch, the set of queued embeddings is the same for any
  device count (only the slot order differs, and Sinkhorn does not depend on it).

Redundancy: every device computes the full [B_global x B_global] logits and the same Sinkhorn
iterations. That costs O(B^2 + Q*B) per device, small next to the encoders for CLIP4Clip's
batch 128, and avoids a collective inside every Sinkhorn iteration.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ncl_jax import checkpointing
from ncl_jax import chips
from ncl_jax import errors
from ncl_jax import evaluate as evaluate_lib
from ncl_jax import logging_utils
from ncl_jax import losses
from ncl_jax import runs
from ncl_jax import sharding
from ncl_jax import tokenizer
from ncl_jax.data import get_dataset, normalize_frames
from ncl_jax.models import convert, dual_encoder
from ncl_jax.queue import Queue, enqueue, init_queue
from ncl_jax.train_state import (LOGIT_SCALE_NAME, TrainState, clamp_logit_scale,
                                 make_optimizer)

DATA = sharding.DATA_AXIS
# jax.profiler traces of config.profile_steps, under the workdir.
PROFILE_DIR = "profile"
# Runs this short log every step, whatever log_every_steps says.
LOG_EVERY_STEP_UP_TO = 100


def log(message: str) -> None:
  """Prints a progress message on process 0."""
  if jax.process_index() == 0:
    print(message, flush=True)


# -- configuration -------------------------------------------------------------------------------


def make_loss_fn(config: ml_collections.ConfigDict) -> losses.LossFn:
  """The loss named by ``config.loss`` with its options from ``config.ncl`` / ``config.dsl``."""
  if config.loss == "ncl":
    n = config.ncl
    return losses.loss_fn_by_name(
        "ncl", use_queue=bool(n.use_queue), include_batch=bool(n.include_batch),
        sinkhorn_logit_scale=(1.0 / n.sinkhorn_temperature if n.sinkhorn_temperature > 0
                              else None),
        tol=float(n.tol), max_iterations=int(n.max_iterations),
        check_every=int(n.check_every), gradient=str(n.gradient))
  if config.loss == "dsl":
    return losses.loss_fn_by_name("dsl", temperature=float(config.dsl.temperature))
  return losses.loss_fn_by_name(config.loss)


def check_model_matches_data(model_config, dataset) -> None:
  """Raises a UserError naming the field when the model cannot read the data set's batches."""
  shape, _ = dataset.video_item_shape()
  data_mode = dataset.input_mode
  problems = []
  if model_config.input_mode != data_mode:
    problems.append(f"model.input_mode is {model_config.input_mode!r} but the data set provides "
                    f"{data_mode!r} (set --config.model.input_mode={data_mode})")
  elif data_mode == "features" and model_config.feature_dim != shape[-1]:
    problems.append(f"model.feature_dim is {model_config.feature_dim} but the data set's frame "
                    f"features have {shape[-1]} (set --config.model.feature_dim={shape[-1]})")
  if model_config.max_frames < dataset.max_frames:
    problems.append(f"model.max_frames {model_config.max_frames} is smaller than the data set's "
                    f"{dataset.max_frames} frames per video")
  if model_config.text.context_length < dataset.max_words:
    problems.append(f"model.text.context_length {model_config.text.context_length} is smaller "
                    f"than the data set's {dataset.max_words} tokens per caption")
  if problems:
    errors.fail("the model config does not fit the data: " + "; ".join(problems))


def use_clip_vocabulary(config: ml_collections.ConfigDict) -> None:
  """Points ``data.vocab_path`` at the CLIP directory's tokenizer when none is set and the
  directory has one (the converter copies it there, e.g. a transformers checkpoint's
  vocab.json + merges.txt), so training needs no separately installed vocabulary file."""
  if not config.get("clip_dir") or config.data.get("vocab_path", None) != "":
    return
  clip_dir = os.path.expanduser(config.clip_dir)
  try:
    tokenizer.find_vocab(clip_dir)
  except errors.UserError:
    return  # no vocabulary there: the data set's default applies
  config.data.vocab_path = clip_dir


def open_dataset(data_config: ml_collections.ConfigDict):
  """:func:`ncl_jax.data.get_dataset`, pointing users of real sets at the synthetic demo."""
  try:
    return get_dataset(data_config)
  except errors.UserError as err:
    if data_config.name == "synthetic" or "synthetic" in str(err):
      raise
    raise errors.UserError(f"{err} (configs/synthetic.py needs no data)") from err


def total_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """``config.total_steps`` when > 0, else ``num_epochs`` epochs of ``steps_per_epoch``."""
  if config.total_steps > 0:
    return int(config.total_steps)
  if config.num_epochs <= 0:
    errors.fail("set config.total_steps > 0 or config.num_epochs > 0")
  return int(config.num_epochs) * int(steps_per_epoch)


# -- train state ---------------------------------------------------------------------------------


def state_specs() -> TrainState:
  """PartitionSpecs of the train state (a pytree prefix): queues split over "data", rest whole."""
  queue_spec = Queue(embeddings=P(DATA), pointer=P(), valid=P(DATA))
  return TrainState(step=P(), params=P(), opt_state=P(), text_queue=queue_spec,
                    video_queue=queue_spec, rng=P())


def _is_spec(x) -> bool:
  return isinstance(x, P)


def state_shardings(abstract_state: TrainState, mesh) -> Any:
  """A full tree of NamedShardings matching ``abstract_state``."""
  return jax.tree.map(
      lambda spec, sub: jax.tree.map(lambda _: NamedSharding(mesh, spec), sub),
      state_specs(), abstract_state, is_leaf=_is_spec)


def dummy_inputs(model_config) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One example (tokens, video, frame_mask) of the shapes the model reads, for ``init``."""
  t = int(model_config.max_frames)
  tokens = jnp.zeros((1, int(model_config.text.context_length)), jnp.int32)
  if model_config.input_mode == "features":
    video = jnp.zeros((1, t, int(model_config.feature_dim)), jnp.float32)
  else:
    size = int(model_config.vision.image_size)
    video = jnp.zeros((1, t, size, size, 3), jnp.float32)
  return tokens, video, jnp.ones((1, t), bool)


def init_params(model: dual_encoder.DualEncoder, seed: int) -> Any:
  """Randomly initialised parameters (a pure function of ``seed``)."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), 0)
  return model.init(key, *dummy_inputs(model.config))["params"]


def new_train_state(params: Any, tx: optax.GradientTransformation, queue_size: int,
                    embed_dim: int, seed: int) -> TrainState:
  """Step 0: fresh optimiser state, empty queues."""
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
      text_queue=init_queue(queue_size, embed_dim), video_queue=init_queue(queue_size, embed_dim),
      rng=jax.random.fold_in(jax.random.PRNGKey(seed), 1))


def load_clip_params(config: ml_collections.ConfigDict, params: Any) -> Any:
  """Copies pretrained CLIP weights from ``config.clip_dir`` into ``params`` (host side)."""
  clip_model, clip_params = convert.load_clip(os.path.expanduser(config.clip_dir))
  return dual_encoder.init_dual_encoder_from_clip(params, clip_params, config.model,
                                                  clip_config=clip_model.config)


# -- the train step ------------------------------------------------------------------------------


def _gather_queue(queue: Queue) -> Queue:
  """The whole queue on every device: slots of all devices, concatenated in device order."""
  return Queue(embeddings=jax.lax.all_gather(queue.embeddings, DATA, tiled=True),
               pointer=queue.pointer,
               valid=jax.lax.all_gather(queue.valid, DATA, tiled=True))


def _chunks(tree: Any, count: int) -> list[Any]:
  """Splits every leading axis [b, ...] into ``count`` consecutive pieces [b / count, ...]."""
  size = jax.tree.leaves(tree)[0].shape[0] // count
  return [jax.tree.map(lambda x, i=i: x[i * size:(i + 1) * size], tree) for i in range(count)]


def _in_sequence(step: Callable, carry: Any, inputs: list[Any]) -> tuple[Any, list[Any]]:
  """``carry, out = step(carry, x)`` for each x in order, unrolled (``carry`` None at first).

  An optimization barrier ties each input to the previous carry, so the compiler cannot start
  a chunk before the previous one has finished: one chunk's activations are live at a time, as
  in a ``scan``. Unrolled rather than a ``scan`` so that XLA's cost analysis counts every chunk
  (it counts a loop body once), which the FLOPs and MFU reports rely on.
  """
  outputs = []
  for x in inputs:
    if carry is not None:
      carry, x = jax.lax.optimization_barrier((carry, x))
    carry, out = step(carry, x)
    outputs.append(out)
  return carry, outputs


def _gradients_in_one_pass(embed, loss_fn, params, batch, key, text_queue, video_queue):
  """Loss, aux, local embeddings, logit scale and dL/dparams (times n, see the module
  docstring) with one forward and backward pass over the device's whole local batch;
  ``embed(params, batch, key) -> (text_emb, video_emb, scale)``."""

  def objective(params):
    text_emb, video_emb, scale = embed(params, batch, key)
    all_text = jax.lax.all_gather(text_emb, DATA, tiled=True)
    all_video = jax.lax.all_gather(video_emb, DATA, tiled=True)
    loss, aux = loss_fn(all_text, all_video, scale, text_queue, video_queue)
    return loss, (aux, text_emb, video_emb, scale)

  (loss, (aux, text_emb, video_emb, scale)), grads = jax.value_and_grad(
      objective, has_aux=True)(params)
  return loss, aux, text_emb, video_emb, scale, grads


def _gradients_in_chunks(embed, loss_fn, params, batch, key, text_queue, video_queue,
                         microbatches: int):
  """The same as :func:`_gradients_in_one_pass` with the activations of one chunk at a time.

  GradCache (Gao et al., 2021): (1) embed the local batch in ``microbatches`` chunks, keeping
  only the embeddings; (2) the loss and its gradient with respect to the embeddings (and the
  logit scale) on the whole global batch, queues included, so the contrastive objective is
  unchanged; (3) each chunk's forward pass again, backpropagating its share of those gradients
  into the parameters, summed over chunks. Each chunk gets its own dropout key, the same in (1)
  and (3).
  """
  chunks = _chunks(batch, microbatches)
  keys = list(jax.random.split(key, microbatches))

  def embed_chunk(previous, inputs):
    del previous  # only orders the chunks
    text_emb, video_emb, _ = embed(params, *inputs)
    return (text_emb, video_emb), (text_emb, video_emb)

  _, embeddings = _in_sequence(embed_chunk, None, list(zip(chunks, keys)))
  text_emb = jnp.concatenate([t for t, _ in embeddings])
  video_emb = jnp.concatenate([v for _, v in embeddings])
  scale = jnp.exp(params[LOGIT_SCALE_NAME])

  def loss_of_embeddings(text_emb, video_emb, scale):
    all_text = jax.lax.all_gather(text_emb, DATA, tiled=True)
    all_video = jax.lax.all_gather(video_emb, DATA, tiled=True)
    return loss_fn(all_text, all_video, scale, text_queue, video_queue)

  (loss, aux), (d_text, d_video, d_scale) = jax.value_and_grad(
      loss_of_embeddings, argnums=(0, 1, 2), has_aux=True)(text_emb, video_emb, scale)
  d_text, d_video = _chunks(d_text, microbatches), _chunks(d_video, microbatches)
  # The scale does not depend on the chunk: a 1/M share of its cotangent in each of M chunks.
  d_scale_share = d_scale / microbatches

  def backprop_chunk(grads, inputs):
    chunk, chunk_key, chunk_d_text, chunk_d_video = inputs
    _, pullback = jax.vjp(lambda p: embed(p, chunk, chunk_key), params)
    (chunk_grads,) = pullback((chunk_d_text, chunk_d_video, d_scale_share))
    if grads is None:  # no zero-filled accumulator: one parameter-sized buffer less
      return chunk_grads, None
    return jax.tree.map(jnp.add, grads, chunk_grads), None

  grads, _ = _in_sequence(backprop_chunk, None, list(zip(chunks, keys, d_text, d_video)))
  return loss, aux, text_emb, video_emb, scale, grads


def make_train_step(model: dual_encoder.DualEncoder, loss_fn: losses.LossFn,
                    tx: optax.GradientTransformation, mesh,
                    schedules: Mapping[str, optax.Schedule] | None = None, *,
                    microbatches: int = 1) -> Callable:
  """Builds the jitted, data-parallel ``step(state, batch) -> (state, metrics)``.

  Args:
    model: the dual encoder.
    loss_fn: ``fn(text [B, E], video [B, E], logit_scale, text_queue, video_queue) ->
      (loss, aux)`` with single-device (global-batch) semantics.
    tx: the optimiser.
    mesh: 1-D mesh with axis "data".
    schedules: learning-rate schedules to report in the metrics.
    microbatches: M > 1 embeds each device's batch in M chunks and keeps the activations of
      one chunk at a time (:func:`_gradients_in_chunks`); the objective and its gradient stay
      those of the whole global batch.

  Returns:
    A function of the (donated) train state and a global batch ``{"text_tokens" [B, L],
    "video" [B, T, ...], "frame_mask" [B, T]}`` split over "data"; the metrics are replicated
    float32 scalars: ``loss``, the loss's aux values, ``grad_norm``, ``logit_scale`` and
    ``lr_<group>``.
  """
  frames = model.config.input_mode == "frames"
  schedules = dict(schedules or {})

  def embed(params, batch, key):
    video = batch["video"]
    if frames:  # uint8 on the wire, CLIP-normalised float on the device (per chunk)
      video = normalize_frames(video, xp=jnp)
    return model.apply({"params": params}, batch["text_tokens"], video, batch["frame_mask"],
                       rngs={"dropout": key})

  def per_device(state: TrainState, batch: dict[str, jax.Array]):
    key = jax.random.fold_in(state.rng, state.step)
    text_queue = _gather_queue(state.text_queue)
    video_queue = _gather_queue(state.video_queue)
    if microbatches > 1:
      loss, aux, text_emb, video_emb, scale, grads = _gradients_in_chunks(
          embed, loss_fn, state.params, batch, key, text_queue, video_queue, microbatches)
    else:
      loss, aux, text_emb, video_emb, scale, grads = _gradients_in_one_pass(
          embed, loss_fn, state.params, batch, key, text_queue, video_queue)
    # Every device computed the same global loss; see the module docstring for why the mean
    # over devices of these gradients is exactly the global gradient.
    grads = jax.lax.pmean(grads, DATA)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = clamp_logit_scale(optax.apply_updates(state.params, updates))
    new_state = TrainState(
        step=state.step + 1, params=params, opt_state=opt_state,
        text_queue=enqueue(state.text_queue, text_emb),
        video_queue=enqueue(state.video_queue, video_emb), rng=state.rng)
    metrics = {"loss": loss, **aux}
    metrics = {k: jax.lax.pmean(jnp.asarray(v, jnp.float32), DATA) for k, v in metrics.items()}
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["logit_scale"] = jnp.asarray(scale, jnp.float32)
    for name, schedule in schedules.items():
      metrics[f"lr_{name}"] = jnp.asarray(schedule(state.step), jnp.float32)
    return new_state, metrics

  specs = state_specs()
  mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(specs, P(DATA)),
                         out_specs=(specs, P()), check_vma=False)
  return jax.jit(mapped, donate_argnums=0)


# -- the job -------------------------------------------------------------------------------------


class Program(NamedTuple):
  """The compiled-to-be parts of a run, built from the config alone (no data, no weights).

  Attributes:
    model: the dual encoder.
    loss_fn: the training objective (single-device, global-batch semantics).
    tx: the optimiser.
    schedules: its learning-rate schedules, by parameter group.
    shardings: NamedShardings of the train state.
    abstract_state: the train state as ShapeDtypeStructs carrying those shardings.
    train_step: the jitted ``step(state, batch) -> (state, metrics)``.
    encoders: the jitted evaluation embedding steps (text and video).
  """

  model: dual_encoder.DualEncoder
  loss_fn: losses.LossFn
  tx: optax.GradientTransformation
  schedules: dict[str, optax.Schedule]
  shardings: Any
  abstract_state: TrainState
  train_step: Callable
  encoders: Any


def check_sizes_split(config: ml_collections.ConfigDict, mesh) -> None:
  """UserError unless the batch, queue and evaluation sizes split over the mesh (and the
  micro-batches over each device's share)."""
  if config.loss not in losses.LOSS_NAMES:
    errors.fail(f"config.loss must be one of {', '.join(losses.LOSS_NAMES)}, "
                f"got {config.loss!r}")
  sharding.check_divisible(config.global_batch_size, mesh, "config.global_batch_size")
  sharding.check_divisible(config.ncl.queue_size, mesh, "config.ncl.queue_size")
  sharding.check_divisible(config.eval.batch_size, mesh, "config.eval.batch_size")
  microbatches = int(config.get("microbatches", 1))
  per_device = int(config.global_batch_size) // mesh.devices.size
  if microbatches < 1 or per_device % microbatches:
    errors.fail(f"config.microbatches = {microbatches} must be >= 1 and divide the "
                f"{per_device} examples per device (global_batch_size "
                f"{config.global_batch_size} over {mesh.devices.size} devices)")


def build_program(config: ml_collections.ConfigDict, mesh, total_steps: int, *,
                  pretrained: bool | None = None) -> Program:
  """The train step and evaluation steps of ``config`` on ``mesh``, without data or weights.

  Args:
    config: a training config (``config.model`` as it will train: options adopted from a CLIP
      checkpoint must already be in it).
    mesh: the 1-D "data" mesh (real devices, or a TPU topology's for ahead-of-time compiles).
    total_steps: the run's length (only the learning-rate schedule depends on it).
    pretrained: whether CLIP weights are loaded (their learning rate differs); default:
      ``bool(config.clip_dir)``.
  """
  check_sizes_split(config, mesh)
  pretrained = bool(config.clip_dir) if pretrained is None else pretrained
  model = dual_encoder.DualEncoder(config.model)
  abstract_params = jax.eval_shape(functools.partial(init_params, model), config.seed)
  labels = dual_encoder.param_labels(abstract_params, config.model, pretrained=pretrained)
  tx, schedules = make_optimizer(config.optimizer, labels, total_steps)
  abstract = jax.eval_shape(lambda p: state_from_params(config, tx, p), abstract_params)
  shardings = state_shardings(abstract, mesh)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  loss_fn = make_loss_fn(config)
  train_step = make_train_step(model, loss_fn, tx, mesh, schedules,
                               microbatches=int(config.get("microbatches", 1)))
  return Program(model=model, loss_fn=loss_fn, tx=tx, schedules=schedules,
                 shardings=shardings, abstract_state=abstract_state, train_step=train_step,
                 encoders=evaluate_lib.make_encoders(model))


def state_from_params(config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                      params: Any) -> TrainState:
  """Step 0 of ``config``'s run from ``params``."""
  return new_train_state(params, tx, int(config.ncl.queue_size), int(config.model.embed_dim),
                         int(config.seed))


def batch_shapes(config: ml_collections.ConfigDict, mesh, rows: int | None = None
                 ) -> dict[str, jax.ShapeDtypeStruct]:
  """The training batch of ``config`` as ShapeDtypeStructs split over "data" (``rows``
  examples, default the global batch): what the data pipeline feeds the train step."""
  rows = int(config.global_batch_size) if rows is None else rows
  frames, words = int(config.data.max_frames), int(config.data.max_words)
  if config.model.input_mode == "frames":
    size = int(config.data.get("image_size", config.model.vision.image_size))
    video = ((rows, frames, size, size, 3), jnp.uint8)
  else:
    video = ((rows, frames, int(config.model.feature_dim)), jnp.float32)
  split = sharding.batch_sharded(mesh)
  shapes = {"text_tokens": ((rows, words), jnp.int32), "video": video,
            "frame_mask": ((rows, frames), jnp.bool_)}
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=split)
          for k, (shape, dtype) in shapes.items()}


class Run:
  """Everything the loop needs, built once from the config."""

  def __init__(self, config: ml_collections.ConfigDict, mesh=None):
    self.config = config
    self.mesh = sharding.make_mesh() if mesh is None else mesh
    check_sizes_split(config, self.mesh)
    use_clip_vocabulary(config)
    self.dataset = open_dataset(config.data)
    check_model_matches_data(config.model, self.dataset)
    self.steps_per_epoch = self.dataset.steps_per_epoch(config.global_batch_size)
    if self.steps_per_epoch < 1:
      errors.fail(f"config.global_batch_size {config.global_batch_size} exceeds the "
                  f"{self.dataset.num_train_examples} training examples")
    self.total_steps = total_train_steps(config, self.steps_per_epoch)
    if config.clip_dir:  # fail before any work if the weights are missing
      clip_config = convert.read_config(os.path.expanduser(config.clip_dir))
      # Activation, layer-norm epsilon, MLP ratio and eos pooling belong to the weights (an
      # open_clip LAION model uses GELU, OpenAI's QuickGELU); sizes stay checked, not copied.
      adopted = convert.adopt_checkpoint_options(config.model, clip_config)
      if adopted:
        log(f"model options from the CLIP checkpoint {config.clip_dir}: {', '.join(adopted)}")
    program = build_program(config, self.mesh, self.total_steps)
    self.program = program
    self.model, self.loss_fn, self.tx = program.model, program.loss_fn, program.tx
    self.schedules, self.shardings = program.schedules, program.shardings
    self.abstract_state, self.train_step = program.abstract_state, program.train_step
    self.encoders = program.encoders
    self.embed_dim = int(config.model.embed_dim)
    self.workdir = ""  # set by train_and_evaluate
    # MFU: FLOPs per step from the compiled step (first step), peak from the chip table.
    self.throughput = logging_utils.Throughput(
        peak_flops=chips.peak_flops_of(self.mesh.devices.flat[0].device_kind))
    evaluate_lib.check_bank(config.eval.bank, config.eval.bank_size)
    self._bank_batches = None  # the training batches of a re-encoded bank, made on first use
    self._reencoded_bank = None  # ((step, size), (text, video)) of the last re-encoded bank

  def train_iterator(self, num_workers: int | None = None):
    """This host's training batches from the start of the run (position 0); ``num_workers``
    Grain worker processes (default ``config.data.num_workers``)."""
    return self.dataset.train_iterator(
        self.config.global_batch_size, seed=int(self.config.data.seed),
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_workers=num_workers)

  def _state_from_params(self, params):
    return state_from_params(self.config, self.tx, params)

  def initial_state(self) -> TrainState:
    """A fresh train state, created directly with its shardings."""
    if self.config.clip_dir:
      params = load_clip_params(self.config, init_params(self.model, int(self.config.seed)))
      return jax.jit(self._state_from_params, out_shardings=self.shardings)(params)
    make = lambda: self._state_from_params(init_params(self.model, int(self.config.seed)))
    return jax.jit(make, out_shardings=self.shardings)()

  def bank(self, state: TrainState) -> tuple[np.ndarray, np.ndarray]:
    """The (text, video) bank of NCL-normalized inference for ``state`` (``config.eval.bank``)."""
    if self.config.eval.bank == "queue":
      return _queue_to_host(state.text_queue), _queue_to_host(state.video_queue)
    size = int(self.config.eval.bank_size) or int(self.config.ncl.queue_size)
    key = (int(state.step), size)
    if self._reencoded_bank is None or self._reencoded_bank[0] != key:
      # The same state is often evaluated twice (validation selection, then each test split).
      positions = evaluate_lib.bank_positions(int(state.step), self.config.global_batch_size,
                                              size)
      if self._bank_batches is None:  # its own iterator, without workers: only batch_at is used
        self._bank_batches = self.train_iterator(num_workers=0)
      batches = (self._bank_batches.batch_at(p) for p in positions)
      self._reencoded_bank = (key, evaluate_lib.encode_training_batches(
          self.encoders, state.params, batches, self.mesh, limit=size))
    return self._reencoded_bank[1]

  def evaluate(self, state: TrainState, split: str, plot_prefix: str | None = None,
               methods=None) -> dict[str, Any]:
    """Plain and NCL-normalized retrieval on ``split`` with the bank of :meth:`bank`.

    ``methods``: other normalizers with their options per direction (see
    :meth:`select_hyperparameters`), reported under ``"methods"``.
    """
    text_bank, video_bank = self.bank(state)
    results = evaluate_lib.evaluate_split(
        self.encoders, state.params, self.dataset.eval_data(split), self.mesh,
        text_bank=text_bank, video_bank=video_bank, eval_config=self.config.eval,
        plot_prefix=plot_prefix, methods=methods)
    results["bank"] = str(self.config.eval.bank)
    return results

  def select_hyperparameters(self, state: TrainState, methods: tuple[str, ...]):
    """``config.eval.methods``' options chosen on the validation split, same bank as evaluate."""
    text_bank, video_bank = self.bank(state)
    return evaluate_lib.select_on_split(
        self.encoders, state.params, self.dataset.eval_data(self.dataset.validation_split),
        self.mesh, text_bank=text_bank, video_bank=video_bank, eval_config=self.config.eval,
        methods=methods)


def _queue_to_host(queue: Queue) -> np.ndarray:
  """The valid embeddings of a (sharded) queue as a numpy array [n_valid, d]."""
  embeddings, valid = sharding.to_host((queue.embeddings, queue.valid))
  return np.asarray(embeddings)[np.asarray(valid, bool)]


def _flatten(tree: Mapping[str, Any], prefix: str) -> dict[str, float]:
  """{"a": {"b": 1.0}} -> {"prefix/a/b": 1.0} for numeric leaves."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}/{key}"
    if isinstance(value, Mapping):
      flat.update(_flatten(value, name))
    elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
      flat[name] = float(value)
  return flat


def _rounded(value: Any) -> Any:
  """Floats at 10 decimals (``67.6``, not ``67.60000000000001`` from 100 * 0.676): 5e-11 at most
  from the computed value, below every tolerance that compares them (export's 1e-9)."""
  if isinstance(value, float):
    return round(value, 10)
  if isinstance(value, Mapping):
    return {k: _rounded(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_rounded(v) for v in value]
  return value


def _write_json(path: str, payload: Any) -> None:
  if jax.process_index() != 0:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(_rounded(payload), f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def _describe_eval(split: str, results: Mapping[str, Any]) -> str:
  parts = []
  for mode in ("plain", "ncl"):
    r = results[mode]
    parts.append(f"{mode}: t2v R@1 {r['t2v']['R@1']:.1f} R@5 {r['t2v']['R@5']:.1f} "
                 f"v2t R@1 {r['v2t']['R@1']:.1f}")
  err = results["normalization_error"]
  return (f"eval {split} ({results['num_texts']} texts x {results['num_videos']} videos): "
          + "; ".join(parts) + f"; normalization error plain {err['plain']:.3f} "
          f"ncl {err['ncl']:.3f}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, mesh=None
                       ) -> dict[str, Any] | None:
  """Trains, selects a checkpoint on the validation split, evaluates the test split once.

  Resumes automatically from the newest checkpoint in ``workdir``. On SIGTERM it finishes the
  current step, saves, and returns None (the caller exits 0; the same command resumes).

  Args:
    config: a config from ``configs/*.py``.
    workdir: run directory (checkpoints, ``metrics.jsonl``, TensorBoard events under ``tb/``,
      ``results.json``, histogram PNGs).
    mesh: the device mesh; default all devices (``ncl_jax.sharding.make_mesh``).

  Returns:
    The results written to ``DIR/results.json``, or None when stopped by SIGTERM.

  Raises:
    UserError: bad config, missing data, a workdir holding another run, or a non-finite loss.
  """
  run = Run(config, mesh)
  run.workdir = workdir
  best_mode = evaluate_lib.select_metric_mode(config.eval.select_metric)  # checks the key early
  if evaluate_lib.extra_methods(config.eval) and run.dataset.validation_split is None:
    errors.fail(f"config.eval.methods chooses each normalizer's hyper-parameters on the "
                f"validation split, and {run.dataset.name} has none; drop config.eval.methods or "
                f"compare normalizers post hoc (python -m ncl_jax.posthoc --select bank)")
  os.makedirs(workdir, exist_ok=True)
  log(f"ncl_jax: loss {config.loss}, {run.dataset.name} ({run.dataset.num_train_examples} "
      f"training examples), global batch {config.global_batch_size} on "
      f"{run.mesh.devices.size} device(s) / {jax.process_count()} process(es), "
      f"{run.total_steps} steps ({run.steps_per_epoch} per epoch)")
  val_split = run.dataset.validation_split
  ckpt = checkpointing.Checkpointer(
      workdir, config=config.to_dict(), max_to_keep=int(config.max_to_keep),
      best_metric=f"val/{config.eval.select_metric}" if val_split else None,
      best_mode=best_mode,
      overwrite=bool(config.overwrite_workdir))
  writer = iterator = None
  try:
    # The training order is a function of (data.seed, epoch); the Grain iterator's position is
    # saved in every checkpoint and restored with the train state.
    iterator = run.train_iterator()
    restored = ckpt.restore_latest(run.abstract_state, data_iterator=iterator.grain_iterator)
    metrics_path = os.path.join(workdir, runs.METRICS_FILE)
    if restored is None:
      state, last_loss = run.initial_state(), None
      checkpointing.rewind_jsonl(metrics_path, None)
    else:
      state, extra = restored
      last_loss = extra.get("last_loss")
      checkpointing.rewind_jsonl(metrics_path, int(state.step))
      log(f"resumed from step {int(state.step)} in {workdir}")
    writer = logging_utils.MetricWriter(workdir)
    stopped, last_loss = _train_loop(run, state, iterator, ckpt, writer, last_loss)
    if stopped is None:
      return None
    state = stopped
    return _final_evaluation(run, state, ckpt, writer, workdir, last_loss)
  finally:
    if iterator is not None:
      iterator.close()   # stops Grain's worker processes
    if writer is not None:
      writer.close()
    ckpt.close()


def check_finite(step: int, values: Mapping[str, float]) -> None:
  """UserError naming the step when its loss or gradient norm is NaN or infinite.

  Runs before the step's state can be saved, so the last checkpoint stays the last good one.
  """
  for key, name in (("loss", "loss"), ("grad_norm", "gradient norm")):
    if key in values and not math.isfinite(values[key]):
      errors.fail(f"the training {name} is not finite at step {step} "
                  f"({key} = {values[key]}); the run stopped. Lower config.optimizer.lr or "
                  "check the data; the last checkpoint is kept")


def step_flops_per_device(train_step, state: TrainState, batch) -> float | None:
  """FLOPs of one train step on one device, from the compiled step's cost analysis.

  Compiling here fills jit's cache, so the first real call does not compile again. XLA counts
  a loop body once (Sinkhorn's while_loop is undercounted), so this is a lower bound.
  """
  cost = train_step.lower(state, batch).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  flops = float((cost or {}).get("flops", 0.0))
  return flops if flops > 0 else None


class ProfileWindow:
  """A jax.profiler trace of steps ``first..last`` (``config.profile_steps``) in WORKDIR/profile.

  Open it with TensorBoard's profile plugin or XProf. ``()`` traces nothing.
  """

  def __init__(self, steps, workdir: str):
    steps = tuple(steps or ())
    if steps and (len(steps) != 2 or not 1 <= int(steps[0]) <= int(steps[1])):
      errors.fail(f"config.profile_steps must be (first, last) with 1 <= first <= last, or (), "
                  f"got {steps}")
    self._steps = tuple(int(s) for s in steps)
    self._dir = os.path.join(workdir, PROFILE_DIR)
    self._tracing = False

  def __enter__(self):
    return self

  def before_step(self, step: int) -> None:
    if self._steps and not self._tracing and self._steps[0] <= step <= self._steps[1]:
      jax.profiler.start_trace(self._dir)
      self._tracing = True

  def after_step(self, step: int, metrics) -> None:
    if self._tracing and step >= self._steps[1]:
      jax.block_until_ready(metrics)  # the traced steps' device work ends inside the trace
      self._stop()
      log(f"profile of steps {self._steps[0]}-{self._steps[1]} written to {self._dir}")

  def _stop(self) -> None:
    jax.profiler.stop_trace()
    self._tracing = False

  def __exit__(self, *exc):
    if self._tracing:
      self._stop()
    return False


def _train_loop(run: Run, state: TrainState, iterator, ckpt, writer, last_loss):
  """Runs the steps; returns (final state, last loss), or (None, loss) after SIGTERM."""
  config = run.config
  total = run.total_steps
  log_every = 1 if total <= LOG_EVERY_STEP_UP_TO else max(1, int(config.log_every_steps))
  eval_every = int(config.eval_every_steps) or run.steps_per_epoch
  ckpt_every = int(config.checkpoint_every_steps)
  val_split = run.dataset.validation_split
  step = int(state.step)
  progress = logging_utils.Progress(total, step)
  pending: list[tuple[int, dict[str, jax.Array]]] = []
  counted_flops = False

  def flush():
    nonlocal last_loss
    for s, metrics in pending:
      values = {k: float(v) for k, v in jax.device_get(metrics).items()}
      check_finite(s, values)
      if s == pending[-1][0]:
        values.update(run.throughput.report(s))
      writer.write(s, values)
      last_loss = values["loss"]
    if pending:
      log(progress.line(pending[-1][0], last_loss))
    pending.clear()

  def extra():
    return {"last_loss": last_loss, "seed": int(config.seed)}

  with checkpointing.PreemptionWatcher() as watcher, ProfileWindow(
      config.profile_steps, run.workdir) as profile:
    while step < total:
      batch = sharding.host_batch_to_global(next(iterator), run.mesh)
      if not counted_flops:
        run.throughput.flops = step_flops_per_device(run.train_step, state, batch)
        counted_flops = True
      profile.before_step(step + 1)
      state, metrics = run.train_step(state, batch)
      step += 1
      profile.after_step(step, metrics)
      watcher.after_step(step)  # test-only SIGTERM hook, a no-op unless its variable is set
      pending.append((step, metrics))
      last = step == total
      evaluate_now = val_split is not None and (step % eval_every == 0 or last)
      save_now = last or evaluate_now or (ckpt_every > 0 and step % ckpt_every == 0)
      stop = watcher.should_stop()
      if step % log_every == 0 or last or evaluate_now or save_now or stop:
        flush()
      val_flat = None
      if evaluate_now:
        results = run.evaluate(state, val_split)
        val_flat = _flatten({k: results[k] for k in ("plain", "ncl", "normalization_error")},
                            "val")
        writer.write(step, val_flat)
        log(_describe_eval(val_split, results))
      if save_now or stop:
        ckpt.save(step, state, extra(), metrics=val_flat, force=True,
                  data_iterator=iterator.grain_iterator)
      if stop:
        ckpt.wait()
        writer.flush()
        log(f"stopped by SIGTERM after step {step}; checkpoint saved, run the same command "
            "again to resume")
        return None, last_loss
  return state, last_loss


def _final_evaluation(run: Run, state: TrainState, ckpt, writer, workdir: str, last_loss):
  """Restores the checkpoint selected on validation and evaluates the test split(s) once."""
  final_step = int(state.step)
  ckpt.wait()
  selected_step = final_step
  if run.dataset.validation_split is not None and ckpt.best_step is not None:
    selected_step = int(ckpt.best_step)
    if selected_step != final_step:
      state, _ = ckpt.restore_best(run.abstract_state)
  test_splits = [s for s in run.dataset.eval_splits if s != run.dataset.validation_split]
  if not test_splits:
    test_splits = [run.dataset.validation_split]
  methods, chosen, report = evaluate_lib.extra_methods(run.config.eval), None, None
  if methods:
    chosen, report = run.select_hyperparameters(state, methods)
  per_split = {}
  for split in test_splits:
    plot = os.path.join(workdir, f"normalization_{split}_step{selected_step}")
    results = run.evaluate(state, split, plot_prefix=plot, methods=chosen)
    per_split[split] = results
    writer.write(final_step, _flatten(
        {k: results[k] for k in ("plain", "ncl", "normalization_error")}, split))
    log(_describe_eval(split, results))
  main = per_split[test_splits[0]]
  payload = {
      "step": final_step,
      "loss": last_loss,
      "eval": {"plain": main["plain"], "ncl": main["ncl"], **(
          {"methods": main["methods"]} if methods else {})},
      "normalization_error": main["normalization_error"],
      "normalization_error_detail": main["normalization_error_detail"],
      "sinkhorn": main["sinkhorn"],
      "temperature": main["temperature"],
      "split": test_splits[0],
      "selected_step": selected_step,
      "selected_on": run.dataset.validation_split,
      **({"hyperparameter_selection": {"split": run.dataset.validation_split,
                                       "report": report}} if methods else {}),
      "loss_name": run.config.loss,
      "num_texts": main["num_texts"],
      "num_videos": main["num_videos"],
      "bank": main["bank"],
      "bank_size": main["bank_size"],
      "splits": {s: {k: r[k] for k in ("plain", "ncl", "normalization_error")}
                 for s, r in per_split.items()},
      "num_devices": int(run.mesh.devices.size),
      "num_processes": jax.process_count(),
      "device_kind": run.mesh.devices.flat[0].device_kind,
      "throughput": run.throughput.summary(),
  }
  _write_json(os.path.join(workdir, runs.RESULTS_FILE), payload)
  writer.flush()
  log(f"wrote {os.path.join(workdir, runs.RESULTS_FILE)}")
  return payload
