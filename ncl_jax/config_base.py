"""Settings shared by every training config: CLIP4Clip's protocol and NCL's knobs.

Not a config on its own: the files in ``configs/`` (``synthetic.py``, ``msrvtt.py``, ``msvd.py``,
``activitynet.py``, ``didemo.py``, ``coco.py``, ``flickr30k.py``) call :func:`get_base_config` or
:func:`get_dataset_config` and override what differs. It lives in the package rather than in
``configs/`` so that config files import it by name (ml_collections loads config files by
path, where a sibling import would not resolve) and so that an installed package has it too.
Every field can be changed on the command line, e.g. ``--config.loss=infonce --config.ncl.queue_size=8192``.

CLIP4Clip protocol (retrieval-background.md §2): global batch 128; AdamW with betas (0.9, 0.98),
eps 1e-6, weight decay 0.2 except biases, norms, embeddings and the logit scale; learning rate
1e-4 for new weights and 1e-4 * 1e-3 for the pretrained CLIP weights; CLIP4Clip's
``warmup_cosine`` schedule with 10% warm-up; grad-norm clipping at 1.0; 5 epochs; seed 42;
the log logit scale clamped at ln 100 after every step.
"""

import ml_collections

from ncl_jax.data import default_data_config
from ncl_jax.models.dual_encoder import default_model_config


def get_base_config(dataset: str) -> ml_collections.ConfigDict:
  """The shared defaults, with ``config.data`` set to the defaults of ``dataset``."""
  config = ml_collections.ConfigDict()

  # Which objective trains the model: "infonce" (CLIP4Clip's symmetric cross-entropy), "ncl"
  # (cross-entropy on logits plus Sinkhorn biases from a query queue) or "dsl" (CAMoE's dual
  # softmax). Evaluation always reports plain and NCL-normalized inference, whatever the loss.
  config.loss = "ncl"
  # Seed of parameter initialisation and the step RNG (data.seed sets the training data order).
  config.seed = 42
  # Examples per optimiser step over all devices and hosts; must divide by the device count.
  # The result does not depend on how many devices share it.
  config.global_batch_size = 128
  # Length of the run: total_steps when > 0, otherwise num_epochs full passes over the training
  # captions (the incomplete last batch of each epoch is dropped).
  config.num_epochs = 5
  config.total_steps = 0

  # CLIP4Clip's optimiser.
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.lr = 1e-4              # peak learning rate of new weights (heads, projections)
  config.optimizer.clip_lr_coef = 1e-3    # CLIP weights train at lr * clip_lr_coef (1e-7)
  config.optimizer.warmup_fraction = 0.1  # CLIP4Clip's warmup_cosine: linear warm-up, then cosine
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.98
  config.optimizer.eps = 1e-6
  config.optimizer.weight_decay = 0.2     # not applied to biases, norms, embeddings, logit scale
  config.optimizer.grad_clip_norm = 1.0   # global-norm clipping; 0 turns it off

  # NCL's knobs (the paper does not publish them; these are reconstructions, see docs/reproduction.md).
  config.ncl = ml_collections.ConfigDict()
  # Slots of each query queue (text and video), split evenly over the devices: every device
  # writes its local batch into its own slice. Must divide by the device count. Every loss keeps
  # the queues (they are the bank of NCL-normalized inference); only "ncl" trains with them.
  config.ncl.queue_size = 16384
  # Sinkhorn queries: the queue's valid entries and/or the current global batch.
  config.ncl.use_queue = True       # False: Sinkhorn on the current global batch only
  config.ncl.include_batch = True   # False: Sinkhorn on the queue only
  # Temperature of the Sinkhorn logits; 0 uses the model's learned temperature (1 / logit scale).
  config.ncl.sinkhorn_temperature = 0.0
  # Sinkhorn stopping rule: relative L1 marginal error <= tol, checked every check_every
  # iterations, at most max_iterations. With gradient="unroll" exactly max_iterations updates
  # run and gradients flow through them; "stop" treats the biases as constants.
  config.ncl.tol = 1e-4             # stop when the relative L1 marginal error is this small
  config.ncl.max_iterations = 200   # cap ("stop") or exact count ("unroll") of iterations
  config.ncl.check_every = 10       # iterations between error checks ("stop")
  config.ncl.gradient = "stop"      # "stop": biases are constants; "unroll": differentiate

  # DSL's prior temperature (CAMoE's released training loss uses 1000 on the logits).
  config.dsl = ml_collections.ConfigDict()
  config.dsl.temperature = 1000.0

  # The model: ViT-B/32 CLIP towers with CLIP4Clip's meanP head (see ncl_jax.models).
  config.model = default_model_config()
  # Directory of pretrained CLIP weights for ncl_jax.models.load_clip; "" trains from scratch
  # (every weight then counts as new and trains at optimizer.lr).
  config.clip_dir = ""

  config.data = default_data_config(dataset)

  # Evaluation. Periodic evaluations use the validation split (model selection); the test split
  # is evaluated once, at the end, with the selected checkpoint.
  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 256            # texts or videos per encoder call (padded, masked)
  # The validation result that picks the checkpoint: "<plain|ncl>/<t2v|v2t>/<R@1|...|MnR>"
  # (R@K maximised, MdR/MnR minimised) or "normalization_error/<plain|ncl>" (the mean relative
  # normalization error of both directions, minimised).
  config.eval.select_metric = "plain/t2v/R@1"
  # Other normalizers reported beside plain and NCL on the test split, comma-separated (any of
  # "ncl,qbnorm,is,csls,nnn,dn,dsl"), each at hyper-parameters chosen on the validation split's
  # R@1 with the same bank (ncl_jax.evaluate.select_hyperparameters), their strength alpha
  # included ("ncl" here: NCL at the chosen alpha); needs a validation split.
  config.eval.methods = ""
  # Inference-time NCL normalization: Sinkhorn biases from a bank of training queries.
  # bank "queue": the training queues as they stand (embeddings computed during training, up to
  # queue_size / global_batch_size steps stale); "reencoded": the same training
  # pairs (the last steps' batches) embedded again with the evaluated parameters. bank_size:
  # pairs of a re-encoded bank, 0 = ncl.queue_size; larger reaches further back in training
  # (capped by the pairs the run has seen).
  config.eval.bank = "queue"
  config.eval.bank_size = 0
  config.eval.sinkhorn_tol = 1e-4
  config.eval.sinkhorn_max_iterations = 1000
  # Multi-caption video-to-text protocol of ncl_jax.metrics ("strict" or "group_max") and the
  # tie policy ("pessimistic", "optimistic" or "mean").
  config.eval.v2t_protocol = "strict"
  config.eval.tie = "pessimistic"

  # Frequencies (0 = never, except the final evaluation and checkpoint, which always happen).
  config.log_every_steps = 50             # runs of <= 100 steps log every step
  config.eval_every_steps = 0             # 0: once per epoch
  config.checkpoint_every_steps = 1000
  config.max_to_keep = 3                  # recent checkpoints kept (plus the best on validation)
  # A workdir holding a run with a different config is never replaced unless this is True.
  config.overwrite_workdir = False

  # Memory and speed. microbatches = M embeds each device's share of the batch in M chunks and
  # keeps one chunk's activations at a time (GradCache): the loss and its gradient still span
  # the whole global batch and the queues, at the cost of a second forward pass
  # (docs/tpu.md says which M each model needs on each TPU).
  config.microbatches = 1
  # (first, last) steps traced with jax.profiler into WORKDIR/profile (TensorBoard's profile
  # plugin, XProf); () traces nothing.
  config.profile_steps = ()
  return config


# Where the real-data configs look for prepared data sets and converted CLIP weights (see the
# docs/training.md); override with --config.data.data_dir / --config.clip_dir.
DATA_ROOT = "~/ncl_jax_data"
CLIP_DIR = "~/ncl_jax_data/clip/ViT-B-32"
HEADS = ("meanP", "seqTransf")
# OpenAI's ViT sizes (also those of open_clip's and transformers' ViT-B-32, ViT-B-16, ViT-L-14),
# each with the directory its converted weights are expected in. The bigger towers compute in
# bfloat16 with rematerialised blocks (parameters stay float32): docs/models.md gives the
# memory a train step needs at these settings.
TOWERS = {
    "vitb32": dict(clip_dir=CLIP_DIR, embed_dim=512, dtype="float32", remat=False,
                   vision=dict(width=768, layers=12, heads=12, patch_size=32, image_size=224),
                   text=dict(width=512, layers=12, heads=8)),
    "vitb16": dict(clip_dir="~/ncl_jax_data/clip/ViT-B-16", embed_dim=512, dtype="bfloat16",
                   remat=True,
                   vision=dict(width=768, layers=12, heads=12, patch_size=16, image_size=224),
                   text=dict(width=512, layers=12, heads=8)),
    "vitl14": dict(clip_dir="~/ncl_jax_data/clip/ViT-L-14", embed_dim=768, dtype="bfloat16",
                   remat=True,
                   vision=dict(width=1024, layers=24, heads=16, patch_size=14, image_size=224),
                   text=dict(width=768, layers=12, heads=12)),
}


def parse_variant(arg: str | None) -> tuple[str, str]:
  """(head, tower) from a config argument such as "seqTransf", "vitl14" or "seqTransf,vitb16".

  Raises:
    ValueError: for a name that is neither a head nor a tower, or two of a kind.
  """
  head, tower = None, None
  for name in filter(None, (arg or "").split(",")):
    if name in HEADS and head is None:
      head = name
    elif name in TOWERS and tower is None:
      tower = name
    else:
      raise ValueError(f"unknown head or model {name!r} in {arg!r}; give at most one head "
                       f"({', '.join(HEADS)}) and one model ({', '.join(TOWERS)}), "
                       "comma-separated")
  return head or "meanP", tower or "vitb32"


def apply_tower(config: ml_collections.ConfigDict, tower: str) -> None:
  """Sets the model sizes, dtype, remat and clip_dir of one of :data:`TOWERS`."""
  spec = TOWERS[tower]
  config.clip_dir = spec["clip_dir"]
  config.model.embed_dim = spec["embed_dim"]
  config.model.dtype = spec["dtype"]
  config.model.remat = spec["remat"]
  config.model.vision.update(spec["vision"])
  config.model.text.update(spec["text"])


def get_dataset_config(dataset: str, variant: str | None) -> ml_collections.ConfigDict:
  """A real data set with CLIP4Clip's recipe: pretrained CLIP on raw frames and a video head.

  Words and frames per example (32 / 12, or 64 / 64 for ActivityNet and DiDeMo) come from
  ``ncl_jax.data.default_data_config``; the model's frame count follows them. The global batch
  (128) and the frames stay CLIP4Clip's whatever the tower.

  Args:
    dataset: "msrvtt", "msvd", "activitynet", "didemo", "coco" or "flickr30k".
    variant: comma-separated head and/or CLIP model, chosen on the command line as
      ``--config=configs/msrvtt.py:seqTransf`` or ``:vitl14`` or ``:seqTransf,vitb16``.
      Heads: CLIP4Clip's "meanP" (default; all CLIP4Clip README commands) or "seqTransf".
      Models (:data:`TOWERS`): "vitb32" (default, float32), "vitb16" and "vitl14" (bfloat16
      compute, remat), reading their weights from ``~/ncl_jax_data/clip/ViT-B-16`` etc.
  """
  head, tower = parse_variant(variant)
  config = get_base_config(dataset)
  config.data.data_dir = DATA_ROOT
  apply_tower(config, tower)
  config.model.input_mode = config.data.input_mode
  config.model.max_frames = config.data.max_frames
  config.model.head = head
  # CLIP4Clip's seqTransf copies the text tower's first 4 blocks, so it has the text heads.
  config.model.head_heads = config.model.text.heads
  return config

