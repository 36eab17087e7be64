"""``config.microbatches`` (GradCache) gives the gradients of the one-pass train step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import train_testutils as tu
from ncl_jax import sharding, train


def _gradient_recorder() -> optax.GradientTransformation:
  """An "optimiser" that leaves the parameters alone and keeps the last gradients as its state."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def _gradients(config, mesh, batches, microbatches):
  """Per step: (loss, gradients) of the train step with ``microbatches`` chunks per device."""
  program = train.build_program(config, mesh, total_steps=10)
  tx = _gradient_recorder()
  step = train.make_train_step(program.model, program.loss_fn, tx, mesh,
                               microbatches=microbatches)
  params = train.init_params(program.model, int(config.seed))
  state = train.state_from_params(config, tx, params)
  out = []
  for batch in batches:
    state, metrics = step(state, sharding.host_batch_to_global(batch, mesh))
    out.append((float(metrics["loss"]), jax.device_get(state.opt_state)))
  return out


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 4])
def test_microbatched_gradients_equal_the_one_pass_steps(devices):
  config = tu.tiny_config("ncl", ncl__queue_size=32)
  mesh = sharding.make_mesh(jax.devices()[:devices])
  with tu.fast_compile():
    iterator = train.open_dataset(config.data).train_iterator(config.global_batch_size, seed=0)
    batches = [next(iterator) for _ in range(2)]  # step 2 runs with a filled queue
    whole = _gradients(config, mesh, batches, microbatches=1)
    chunked = _gradients(config, mesh, batches, microbatches=2 if devices == 1 else 4)
  for (loss1, grads1), (loss_m, grads_m) in zip(whole, chunked):
    assert np.isfinite(loss1)
    np.testing.assert_allclose(loss_m, loss1, rtol=1e-6)
    leaves1, leaves_m = jax.tree.leaves(grads1), jax.tree.leaves(grads_m)
    assert len(leaves1) == len(leaves_m) > 10
    assert any(np.abs(g).max() > 1e-4 for g in leaves1)  # not a trivially zero gradient
    for g1, gm in zip(leaves1, leaves_m):
      np.testing.assert_allclose(gm, g1, rtol=1e-4, atol=1e-6)


def test_microbatches_must_divide_the_per_device_batch():
  config = tu.tiny_config("ncl", microbatches=3)
  with pytest.raises(Exception, match=r"config.microbatches = 3 must be >= 1 and divide the 4"):
    train.check_sizes_split(config, sharding.make_mesh())
