"""The built-in demo: train and evaluate on the synthetic retrieval set, no data needed.

Run (one to two minutes on a 2-core CPU)::

  python -m ncl_jax.main --config=configs/synthetic.py --workdir=/tmp/ncl_demo

The synthetic set (``ncl_jax.data.synthetic``) has token-id captions and per-frame features with
popular concepts that create hub videos. The model is a small from-scratch text transformer
against the frame features pooled by CLIP4Clip's meanP head, so the whole CLIP4Clip protocol is
kept except the sizes and the learning rate (no pretrained weights: every weight is new).
Compare the losses with ``--config.loss=infonce`` and ``--config.loss=ncl``;
``--config.data.seed=N`` draws another synthetic set.
"""

from ncl_jax import config_base


def get_config():
  config = config_base.get_base_config("synthetic")
  data = config.data
  config.global_batch_size = 64
  config.num_epochs = 8
  config.optimizer.lr = 1e-3  # from scratch: CLIP4Clip's 1e-4 is for fine-tuning CLIP
  config.ncl.queue_size = 1024

  model = config.model
  model.input_mode = "features"
  model.feature_dim = data.feature_dim
  # embed_dim = feature_dim: the frame features enter meanP directly, as CLIP frame embeddings
  # do in CLIP4Clip; the text tower learns to meet them.
  model.embed_dim = data.feature_dim
  model.max_frames = data.max_frames
  model.text.width = 128
  model.text.layers = 2
  model.text.heads = 4
  model.text.vocab_size = data.vocab_size
  model.text.context_length = data.max_words
  model.vision.width = 64  # unused in features mode
  model.vision.layers = 1
  model.vision.heads = 1
  model.head = "meanP"

  config.eval.batch_size = 256
  config.log_every_steps = 10
  config.eval_every_steps = 0  # once per epoch
  # A checkpoint follows every evaluation (each epoch), so no extra periodic saves.
  config.checkpoint_every_steps = 0
  return config
