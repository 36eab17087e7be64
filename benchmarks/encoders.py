"""Encoder throughput: ncl_jax's Flax CLIP vs OpenAI's PyTorch CLIP with the same weights.

Run from the repository root (needs torch and ``pip install --no-deps clip-anytorch``)::

  python benchmarks/encoders.py            # CPU forward pass: frames/s and captions/s
  python benchmarks/encoders.py --gpu      # GPU train step, ViT-B/32 + meanP, 128 x 12 frames, bf16

CPU mode builds a ViT-B/32-shaped CLIP with random weights in PyTorch, converts it with
``ncl_jax.models.convert``, and times the image tower on ``--frames`` CLIP-sized frames and the
text tower on ``--captions`` captions of ``--words`` tokens (CLIP4Clip's max_words 32), both
frameworks in the same process with the same threads, weights and batches. Compilation and
warm-up runs are excluded; the two frameworks run alternately and the median of
``--repeats`` runs of each is reported.

GPU mode times one optimiser step (AdamW, symmetric InfoNCE, meanP head) of the whole dual
encoder with bfloat16 compute and float32 parameters: ncl_jax (jit, donated state) against the
PyTorch reference (``torch.autocast(bfloat16)``, fused AdamW). ``--tiny`` shrinks the model and
batch so that the script itself can be checked on a CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# embed, resolution, vision layers, vision width, patch, context, vocab, text width, text layers
VIT_B32 = (512, 224, 12, 768, 32, 77, 49408, 512, 12)
TINY = (64, 32, 2, 64, 16, 16, 1000, 64, 2)


def reference_clip_module():
  """OpenAI's clip/model.py, loaded from its file (the package __init__ needs torchvision)."""
  spec = importlib.util.find_spec("clip")
  if spec is None or not spec.submodule_search_locations:
    sys.exit("error: the reference needs: pip install --no-deps clip-anytorch==2.6.0")
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "model.py"
  module_spec = importlib.util.spec_from_file_location("reference_clip_model", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def build_reference(shape, seed=0):
  import torch

  torch.manual_seed(seed)
  embed, res, v_layers, v_width, patch, context, vocab, t_width, t_layers = shape
  return reference_clip_module().CLIP(embed, res, v_layers, v_width, patch, context, vocab,
                                      t_width, t_width // 64, t_layers).float()


def convert(model):
  from ncl_jax.models import convert as convert_lib

  state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
  return convert_lib.convert_state_dict(state)


def tokens_for(rng, n, length, vocab):
  tokens = rng.integers(1, vocab - 2, size=(n, length)).astype(np.int64)
  tokens[:, 0] = vocab - 2
  tokens[:, -1] = vocab - 1  # end token last: full-length captions
  return tokens


def timed_pair(ours, peer, repeats, warmup=2):
  """Median seconds per call of ``ours`` and ``peer``, measured alternately.

  Alternating makes both see the same background load on a shared machine.
  """
  for _ in range(warmup):
    ours()
    peer()
  times = {ours: [], peer: []}
  for _ in range(repeats):
    for fn in (ours, peer):
      start = time.perf_counter()
      fn()
      times[fn].append(time.perf_counter() - start)
  return statistics.median(times[ours]), statistics.median(times[peer])


def cpu_forward(args) -> dict:
  import jax
  import jax.numpy as jnp
  import torch

  from ncl_jax.models import CLIP

  threads = os.cpu_count()
  torch.set_num_threads(threads)
  shape = TINY if args.tiny else VIT_B32
  reference = build_reference(shape).eval()
  config, params = convert(reference)
  model = CLIP(config)
  rng = np.random.default_rng(0)
  res = config.vision.image_size
  images = rng.standard_normal((args.frames, res, res, 3)).astype(np.float32)
  tokens = tokens_for(rng, args.captions, min(args.words, config.text.context_length),
                      config.text.vocab_size)

  encode_image = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_image))
  encode_text = jax.jit(lambda p, t: model.apply({"params": p}, t, method=model.encode_text))
  params = jax.device_put(params)
  images_j, tokens_j = jax.device_put(images), jax.device_put(jnp.asarray(tokens, jnp.int32))
  images_t = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  tokens_t = torch.from_numpy(tokens)

  def torch_image():
    with torch.inference_mode():
      reference.encode_image(images_t)

  def torch_text():
    with torch.inference_mode():
      reference.encode_text(tokens_t)

  # Same outputs first, so the timings compare the same computation.
  with torch.inference_mode():
    gap = float(np.abs(np.asarray(encode_image(params, images_j))
                       - reference.encode_image(images_t).numpy()).max())
  jax_image_s, torch_image_s = timed_pair(
      lambda: encode_image(params, images_j).block_until_ready(), torch_image, args.repeats)
  jax_text_s, torch_text_s = timed_pair(
      lambda: encode_text(params, tokens_j).block_until_ready(), torch_text, args.repeats)
  results = {
      "mode": "cpu-forward", "machine": f"{platform.processor() or platform.machine()}, "
                                        f"{threads} cores", "model": "tiny" if args.tiny
      else "ViT-B/32", "frames": args.frames, "captions": args.captions,
      "words": int(tokens.shape[1]), "max_abs_image_gap": gap,
      "jax_frames_per_s": args.frames / jax_image_s,
      "torch_frames_per_s": args.frames / torch_image_s,
      "jax_captions_per_s": args.captions / jax_text_s,
      "torch_captions_per_s": args.captions / torch_text_s,
  }
  results["frames_ratio"] = results["jax_frames_per_s"] / results["torch_frames_per_s"]
  results["captions_ratio"] = results["jax_captions_per_s"] / results["torch_captions_per_s"]
  return results


def jax_train_step(config, params, batch_size, lr=1e-7):
  import jax
  import jax.numpy as jnp
  import optax

  from ncl_jax.models import DualEncoder

  model = DualEncoder(config)
  tx = optax.adamw(lr, weight_decay=0.2)

  def loss_fn(p, tokens, video, mask):
    text, vid, scale = model.apply({"params": p}, tokens, video, mask)
    logits = scale * text @ vid.T
    labels = jnp.arange(batch_size)
    return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                  + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())

  def step(state, tokens, video, mask):
    p, opt = state
    loss, grads = jax.value_and_grad(loss_fn)(p, tokens, video, mask)
    updates, opt = tx.update(grads, opt, p)
    return (optax.apply_updates(p, updates), opt), loss

  return jax.jit(step, donate_argnums=0), (params, tx.init(params))


def gpu_train(args) -> dict:
  import jax
  import jax.numpy as jnp
  import torch

  from ncl_jax.models import DualEncoder, config_from_clip, default_model_config
  from ncl_jax.models import init_dual_encoder_from_clip

  device = "cuda" if torch.cuda.is_available() else "cpu"
  if not args.tiny and (jax.default_backend() != "gpu" or device != "cuda"):
    sys.exit(f"error: --gpu needs a GPU for both JAX (backend: {jax.default_backend()}) and "
             f"PyTorch (cuda available: {torch.cuda.is_available()}); add --tiny for a CPU check")
  shape = TINY if args.tiny else VIT_B32
  batch, n_frames = (4, 3) if args.tiny else (args.batch, args.num_frames)
  words = min(args.words, shape[5])
  reference = build_reference(shape)
  clip_config, clip_params = convert(reference)
  config = config_from_clip(default_model_config(), clip_config)
  config.update(input_mode="frames", head="meanP", max_frames=n_frames, dtype="bfloat16")
  rng = np.random.default_rng(0)
  res = clip_config.vision.image_size
  video = rng.standard_normal((batch, n_frames, res, res, 3)).astype(np.float32)
  tokens = tokens_for(rng, batch, words, clip_config.text.vocab_size)
  mask = np.ones((batch, n_frames), bool)

  params = DualEncoder(config).init(jax.random.key(0), jnp.asarray(tokens[:1], jnp.int32),
                                    jnp.asarray(video[:1]), jnp.asarray(mask[:1]))["params"]
  params = init_dual_encoder_from_clip(params, clip_params, config)
  step, state = jax_train_step(config, params, batch)
  inputs = (jnp.asarray(tokens, jnp.int32), jnp.asarray(video, jnp.bfloat16), jnp.asarray(mask))

  def run_jax():
    nonlocal state
    state, loss = step(state, *inputs)
    loss.block_until_ready()

  reference = reference.to(device).train()
  optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-7, weight_decay=0.2,
                                fused=device == "cuda")
  video_t = torch.from_numpy(video.transpose(0, 1, 4, 2, 3).copy()).to(device)
  tokens_t = torch.from_numpy(tokens).to(device)
  mask_t = torch.from_numpy(mask).to(device).float()
  labels = torch.arange(batch, device=device)

  def run_torch():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
      frames = reference.encode_image(video_t.flatten(0, 1)).view(batch, n_frames, -1)
      text = reference.encode_text(tokens_t)
    # CLIP4Clip's meanP in float32: normalise frames, masked mean, normalise.
    frames = frames.float()
    frames = frames / frames.norm(dim=-1, keepdim=True)
    vid = (frames * mask_t[..., None]).sum(1) / mask_t.sum(1, keepdim=True)
    vid = vid / vid.norm(dim=-1, keepdim=True)
    text = text.float()
    text = text / text.norm(dim=-1, keepdim=True)
    logits = reference.logit_scale.exp() * text @ vid.t()
    loss = 0.5 * (torch.nn.functional.cross_entropy(logits, labels)
                  + torch.nn.functional.cross_entropy(logits.t(), labels))
    loss.backward()
    optimizer.step()
    if device == "cuda":
      torch.cuda.synchronize()

  jax_s, torch_s = timed_pair(run_jax, run_torch, args.repeats, warmup=3)
  return {"mode": "train-step", "device": jax.devices()[0].device_kind,
          "model": "tiny" if args.tiny else "ViT-B/32 + meanP", "batch": batch,
          "frames": n_frames, "words": words, "dtype": "bfloat16 compute, float32 params",
          "jax_videos_per_s": batch / jax_s, "torch_videos_per_s": batch / torch_s,
          "ratio": torch_s / jax_s}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--gpu", action="store_true", help="GPU train-step benchmark")
  parser.add_argument("--tiny", action="store_true", help="tiny model: checks the script runs")
  parser.add_argument("--frames", type=int, default=32, help="CPU mode: frames per batch")
  parser.add_argument("--captions", type=int, default=64, help="CPU mode: captions per batch")
  parser.add_argument("--words", type=int, default=32, help="tokens per caption")
  parser.add_argument("--batch", type=int, default=128, help="GPU mode: videos per step")
  parser.add_argument("--num-frames", type=int, default=12, help="GPU mode: frames per video")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  if args.gpu:
    # JAX and PyTorch share the GPU in this process: JAX must not grab 75% of it up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  results = gpu_train(args) if args.gpu else cpu_forward(args)
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
