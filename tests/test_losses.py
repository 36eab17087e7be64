"""Tests for InfoNCE, DSL and NCL against float64 numpy computations of the same definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ncl_jax import errors
from ncl_jax import losses
from ncl_jax import queue as queue_lib

# Tight Sinkhorn settings for value comparisons (float32 cannot go much below 1e-5 relative L1).
TIGHT = dict(tol=1e-6, max_iterations=5000)


# ----------------------------------------------------------------------------------------------
# float64 numpy references, written from the definitions in ncl_jax/losses.py's docstring.


def unit_rows(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def np_lse(x, axis):
  m = np.max(x, axis=axis, keepdims=True)
  return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def np_ce_diag(logits):
  """mean_i -log softmax_j(logits)_ii."""
  return np.mean(np_lse(logits, 1) - np.diag(logits))


def np_sinkhorn_biases(logits, iterations=None):
  """Column potential g with rows of exp(L + f + g) summing to 1 and columns to Q / N.

  Alternates f then g from zero potentials; runs to convergence (1e-12 row error) unless a
  fixed number of iterations is given.
  """
  logits = np.asarray(logits, np.float64)
  q, n = logits.shape
  if q == 0:
    return np.zeros(n)
  f, g = np.zeros(q), np.zeros(n)
  log_b = np.log(q / n)
  for it in range(iterations or 100_000):
    f = -np_lse(logits + g[None, :], 1)
    g = log_b - np_lse(logits + f[:, None], 0)
    if iterations is None and it % 10 == 0:
      rows = np.exp(logits + f[:, None] + g[None, :]).sum(1)
      if np.max(np.abs(rows - 1)) < 1e-12:
        return g
  assert iterations is not None, "numpy Sinkhorn did not converge"
  return g


def np_ncl_direction(query, cand, scale, bank=None, include_batch=True, sinkhorn_scale=None,
                     biases=None, iterations=None):
  """Mean CE of scale * query @ cand.T + Sinkhorn biases from [bank ; query] x cand."""
  if biases is None:
    parts = ([bank] if bank is not None else []) + ([query] if include_batch else [])
    queries = np.concatenate(parts) if parts else np.zeros((0, query.shape[1]))
    s = scale if sinkhorn_scale is None else sinkhorn_scale
    biases = np_sinkhorn_biases(s * queries @ cand.T, iterations)
  return np_ce_diag(scale * query @ cand.T + biases[None, :])


def np_ncl(t, v, scale, text_bank=None, video_bank=None, **kw):
  return 0.5 * (np_ncl_direction(t, v, scale, text_bank, **kw)
                + np_ncl_direction(v, t, scale, video_bank, **kw))


def np_dsl(t, v, scale, temperature=1000.0):
  def one(s):
    prior = np.exp(s / temperature - np_lse(s / temperature, 0)[None, :])
    return np_ce_diag(s * s.shape[0] * prior)
  s = scale * t @ v.T
  return 0.5 * (one(s) + one(s.T))


def fd_grad(fun, x, eps=1e-6):
  """Central finite differences of a float64 scalar function."""
  grad = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    xp, xm = x.copy(), x.copy()
    xp[idx] += eps
    xm[idx] -= eps
    grad[idx] = (fun(xp) - fun(xm)) / (2 * eps)
  return grad


def make_pair(rng, b, d, noise=0.5):
  """Unit text/video embeddings with correlated positives (float64)."""
  v = unit_rows(rng.normal(size=(b, d)))
  t = unit_rows(v + noise * rng.normal(size=(b, d)))
  return t, v


def make_queue(rows, capacity, rng):
  """A queue holding `rows` plus unwritten slots filled with random unit vectors (invalid)."""
  dim = rows.shape[1]
  garbage = unit_rows(rng.normal(size=(capacity, dim)))
  emb = garbage.copy()
  emb[:len(rows)] = rows
  valid = np.arange(capacity) < len(rows)
  return queue_lib.Queue(jnp.asarray(emb, jnp.float32), jnp.int32(len(rows) % capacity),
                         jnp.asarray(valid))


def f32(x):
  return jnp.asarray(x, jnp.float32)


# ----------------------------------------------------------------------------------------------
# InfoNCE and DSL.


def test_infonce_matches_numpy_value_and_gradient(rng):
  t, v = make_pair(rng, 5, 4)
  scale = 20.0
  got = losses.infonce_loss(f32(t), f32(v), scale)
  want = 0.5 * (np_ce_diag(scale * t @ v.T) + np_ce_diag(scale * v @ t.T))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  gt, gv = jax.jit(jax.grad(losses.infonce_loss, argnums=(0, 1)))(f32(t), f32(v), scale)
  np_loss = lambda t_, v_: 0.5 * (np_ce_diag(scale * t_ @ v_.T) + np_ce_diag(scale * v_ @ t_.T))
  np.testing.assert_allclose(np.asarray(gt), fd_grad(lambda x: np_loss(x, v), t), atol=2e-4)
  np.testing.assert_allclose(np.asarray(gv), fd_grad(lambda x: np_loss(t, x), v), atol=2e-4)


def test_infonce_at_clip_scale_is_finite_and_correct(rng):
  t, v = make_pair(rng, 8, 16, noise=2.0)
  got = losses.infonce_loss(f32(t), f32(v), 100.0)
  want = 0.5 * (np_ce_diag(100 * t @ v.T) + np_ce_diag(100 * v @ t.T))
  np.testing.assert_allclose(float(got), want, rtol=1e-4)


@pytest.mark.parametrize("scale,temperature", [(100.0, 1000.0), (10.0, 1.0)])
def test_dsl_matches_numpy(rng, scale, temperature):
  t, v = make_pair(rng, 6, 5)
  got = losses.dsl_loss(f32(t), f32(v), scale, temperature=temperature)
  np.testing.assert_allclose(float(got), np_dsl(t, v, scale, temperature), rtol=1e-4)


def test_dsl_gradient_matches_finite_differences(rng):
  t, v = make_pair(rng, 4, 3)
  scale, temp = 10.0, 1.0
  gt, gv = jax.jit(jax.grad(lambda a, b: losses.dsl_loss(a, b, scale, temperature=temp),
                            argnums=(0, 1)))(f32(t), f32(v))
  np.testing.assert_allclose(np.asarray(gt), fd_grad(lambda x: np_dsl(x, v, scale, temp), t),
                             atol=2e-4)
  np.testing.assert_allclose(np.asarray(gv), fd_grad(lambda x: np_dsl(t, x, scale, temp), v),
                             atol=2e-4)


def test_dsl_with_flat_prior_is_infonce(rng):
  t, v = make_pair(rng, 6, 5)
  flat = losses.dsl_loss(f32(t), f32(v), 30.0, temperature=1e9)
  np.testing.assert_allclose(float(flat), float(losses.infonce_loss(f32(t), f32(v), 30.0)),
                             rtol=1e-5)
  sharp = losses.dsl_loss(f32(t), f32(v), 30.0, temperature=1.0)
  assert abs(float(sharp) - float(flat)) > 1e-2


# ----------------------------------------------------------------------------------------------
# NCL building blocks.


def test_biased_cross_entropy_matches_numpy(rng):
  logits = rng.normal(size=(3, 5)) * 5
  biases = rng.normal(size=5)
  labels = np.array([4, 0, 2])
  got = losses.biased_cross_entropy(f32(logits), f32(biases), jnp.asarray(labels))
  z = logits + biases
  want = np_lse(z, 1) - z[np.arange(3), labels]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
  mask = np.array([True, False, True, True, True])
  got_masked = losses.biased_cross_entropy(f32(logits), f32(biases), jnp.asarray(labels),
                                           jnp.asarray(mask))
  want_masked = np_lse(z[:, mask], 1) - z[np.arange(3), labels]
  np.testing.assert_allclose(np.asarray(got_masked), want_masked, rtol=1e-5)


def test_candidate_biases_balance_columns(rng):
  """Independent of the numpy Sinkhorn: the softmax over candidates of L + beta gives every
  candidate Q / N of the summed probability, counting only unmasked queries."""
  queries = unit_rows(rng.normal(size=(10, 4)))
  cands = unit_rows(rng.normal(size=(4, 4)))
  mask = np.array([True] * 7 + [False] * 3)
  beta = losses.ncl_candidate_biases(f32(queries), f32(cands), 30.0, jnp.asarray(mask), **TIGHT)
  z = 30.0 * queries[mask] @ cands.T + np.asarray(beta, np.float64)[None, :]
  p = np.exp(z - np_lse(z, 1)[:, None])
  np.testing.assert_allclose(p.sum(0), np.full(4, 7 / 4), rtol=1e-4)
  # A hub candidate (close to every query) gets a lower bias than the others.
  hub = unit_rows(np.concatenate([queries[:7].mean(0, keepdims=True), cands[1:]]))
  beta_hub = np.asarray(losses.ncl_candidate_biases(f32(queries), f32(hub), 30.0,
                                                    jnp.asarray(mask), **TIGHT))
  assert beta_hub[0] < beta_hub[1:].min()


def test_candidate_biases_match_numpy_sinkhorn(rng):
  queries = unit_rows(rng.normal(size=(7, 5)))
  cands = unit_rows(rng.normal(size=(4, 5)))
  beta = np.asarray(losses.ncl_candidate_biases(f32(queries), f32(cands), 25.0, **TIGHT))
  want = np_sinkhorn_biases(25.0 * queries @ cands.T)
  # Biases are defined up to a constant.
  np.testing.assert_allclose(beta - beta.mean(), want - want.mean(), atol=2e-4)


# ----------------------------------------------------------------------------------------------
# NCL loss.


def test_ncl_orthonormal_case_equals_infonce():
  """Hand-built: texts == videos == an orthonormal basis. By symmetry all biases are equal, so
  NCL (batch-only Sinkhorn) equals InfoNCE, and numpy agrees."""
  e = np.eye(4)
  got, aux = losses.ncl_loss(f32(e), f32(e), 3.0, **TIGHT)
  want = np_ncl(e, e, 3.0)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  np.testing.assert_allclose(float(got), float(losses.infonce_loss(f32(e), f32(e), 3.0)),
                             rtol=1e-5)
  assert int(aux["num_queries_t2v"]) == 4


def test_ncl_hub_case_matches_numpy():
  """Hand-built: video 0 sits between all texts (a hub); NCL must differ from InfoNCE."""
  t = np.eye(4)
  v = unit_rows(np.array([[1.0, 0.6, 0.6, 0.6], [0.1, 1, 0, 0], [0, 0.1, 1, 0], [0, 0, 0.1, 1]]))
  got, aux = losses.ncl_loss(f32(t), f32(v), 5.0, **TIGHT)
  np.testing.assert_allclose(float(got), np_ncl(t, v, 5.0), rtol=1e-4)
  np.testing.assert_allclose(float(aux["loss_t2v"]), np_ncl_direction(t, v, 5.0), rtol=1e-4)
  np.testing.assert_allclose(float(aux["loss_v2t"]), np_ncl_direction(v, t, 5.0), rtol=1e-4)
  assert abs(float(got) - float(aux["infonce"])) > 1e-2
  assert float(aux["sinkhorn_error_t2v"]) <= 1e-5


def test_ncl_empty_queue_matches_numpy(rng):
  # Square (batch-only) problems with peaked logits converge slowly, so a moderate scale here;
  # CLIP's scale 100 is tested with a queue below, the setting NCL trains in.
  t, v = make_pair(rng, 4, 8, noise=1.0)
  tq, vq = queue_lib.init_queue(6, 8), queue_lib.init_queue(6, 8)
  got, aux = losses.ncl_loss(f32(t), f32(v), 15.0, tq, vq, **TIGHT)
  np.testing.assert_allclose(float(got), np_ncl(t, v, 15.0), rtol=2e-4)
  assert int(aux["num_queries_t2v"]) == 4 and int(aux["num_queries_v2t"]) == 4


def test_ncl_at_clip_scale_with_queue_matches_numpy(rng):
  # 64-d embeddings spread the cosines like real CLIP features do (logits within ~30).
  t, v = make_pair(rng, 4, 64, noise=2.0)
  bank_t, bank_v = make_pair(rng, 6, 64, noise=2.0)
  tq, vq = make_queue(bank_t, 6, rng), make_queue(bank_v, 6, rng)
  got, aux = losses.ncl_loss(f32(t), f32(v), 100.0, tq, vq, **TIGHT)
  np.testing.assert_allclose(float(got), np_ncl(t, v, 100.0, bank_t, bank_v), rtol=2e-4)
  assert float(aux["sinkhorn_error_t2v"]) <= 1e-5 and float(aux["sinkhorn_error_v2t"]) <= 1e-5


def test_ncl_without_queries_is_infonce(rng):
  t, v = make_pair(rng, 5, 4)
  got, aux = losses.ncl_loss(f32(t), f32(v), 20.0, include_batch=False)
  np.testing.assert_allclose(float(got), float(losses.infonce_loss(f32(t), f32(v), 20.0)),
                             rtol=1e-6)
  assert int(aux["num_queries_t2v"]) == 0


def test_ncl_with_queue_matches_numpy_and_ignores_unwritten_slots(rng):
  t, v = make_pair(rng, 4, 6)
  bank_t, bank_v = make_pair(rng, 3, 6)
  scale = 20.0
  exact_t, exact_v = make_queue(bank_t, 3, rng), make_queue(bank_v, 3, rng)
  padded_t, padded_v = make_queue(bank_t, 6, rng), make_queue(bank_v, 6, rng)
  want = np_ncl(t, v, scale, bank_t, bank_v)
  exact, _ = losses.ncl_loss(f32(t), f32(v), scale, exact_t, exact_v, **TIGHT)
  padded, aux = losses.ncl_loss(f32(t), f32(v), scale, padded_t, padded_v, **TIGHT)
  np.testing.assert_allclose(float(exact), want, rtol=2e-4)
  np.testing.assert_allclose(float(padded), float(exact), rtol=1e-5)
  assert int(aux["num_queries_t2v"]) == 7  # 3 queued + 4 batch
  # Non-vacuous: counting the garbage slots as valid changes the loss.
  all_valid = padded_t._replace(valid=jnp.ones(6, bool))
  polluted, _ = losses.ncl_loss(f32(t), f32(v), scale, all_valid, padded_v, **TIGHT)
  assert abs(float(polluted) - float(padded)) > 1e-3
  # Gradients ignore the unwritten slots too.
  grad = jax.jit(jax.grad(lambda a, b, tq, vq: losses.ncl_loss(a, b, scale, tq, vq, **TIGHT)[0],
                          argnums=(0, 1)))
  for g_exact, g_padded in zip(grad(f32(t), f32(v), exact_t, exact_v),
                               grad(f32(t), f32(v), padded_t, padded_v)):
    np.testing.assert_allclose(np.asarray(g_padded), np.asarray(g_exact), atol=1e-5)


def test_ncl_options_match_numpy(rng):
  t, v = make_pair(rng, 4, 6)
  bank_t, bank_v = make_pair(rng, 6, 6)
  tq, vq = make_queue(bank_t, 6, rng), make_queue(bank_v, 6, rng)
  queue_only, _ = losses.ncl_loss(f32(t), f32(v), 10.0, tq, vq, include_batch=False, **TIGHT)
  np.testing.assert_allclose(float(queue_only),
                             np_ncl(t, v, 10.0, bank_t, bank_v, include_batch=False), rtol=2e-4)
  other_scale, _ = losses.ncl_loss(f32(t), f32(v), 10.0, tq, vq, sinkhorn_logit_scale=25.0,
                                   **TIGHT)
  np.testing.assert_allclose(float(other_scale),
                             np_ncl(t, v, 10.0, bank_t, bank_v, sinkhorn_scale=25.0), rtol=2e-4)
  no_queue, _ = losses.ncl_loss(f32(t), f32(v), 10.0, tq, vq, use_queue=False, **TIGHT)
  np.testing.assert_allclose(float(no_queue), np_ncl(t, v, 10.0), rtol=2e-4)
  assert len({round(float(x), 4) for x in (queue_only, other_scale, no_queue)}) == 3


def test_stop_gradient_is_ce_with_constant_biases(rng):
  t, v = make_pair(rng, 4, 3)
  bank_t, bank_v = make_pair(rng, 2, 3)
  tq, vq = make_queue(bank_t, 6, rng), make_queue(bank_v, 6, rng)
  scale = 15.0
  beta_v = np_sinkhorn_biases(scale * np.concatenate([bank_t, t]) @ v.T)
  beta_t = np_sinkhorn_biases(scale * np.concatenate([bank_v, v]) @ t.T)

  def frozen(t_, v_):
    return 0.5 * (np_ncl_direction(t_, v_, scale, biases=beta_v)
                  + np_ncl_direction(v_, t_, scale, biases=beta_t))

  stop_loss = lambda a, b: losses.ncl_loss(a, b, scale, tq, vq, gradient="stop", **TIGHT)[0]
  gt, gv = jax.jit(jax.grad(stop_loss, argnums=(0, 1)))(f32(t), f32(v))
  np.testing.assert_allclose(np.asarray(gt), fd_grad(lambda x: frozen(x, v), t), atol=3e-4)
  np.testing.assert_allclose(np.asarray(gv), fd_grad(lambda x: frozen(t, x), v), atol=3e-4)


def test_unrolled_gradient_flows_through_biases(rng):
  """With enough unrolled iterations the gradient is that of the converged loss, biases
  included (finite differences of the float64 numpy loss), and differs from stop mode."""
  t, v = make_pair(rng, 4, 3)
  bank_t, bank_v = make_pair(rng, 2, 3)
  tq, vq = make_queue(bank_t, 6, rng), make_queue(bank_v, 6, rng)
  scale = 8.0
  unroll = dict(gradient="unroll", max_iterations=300)
  loss_fn = lambda a, b: losses.ncl_loss(a, b, scale, tq, vq, **unroll)[0]
  gt, gv = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(f32(t), f32(v))
  full = lambda t_, v_: np_ncl(t_, v_, scale, bank_t, bank_v)
  np.testing.assert_allclose(np.asarray(gt), fd_grad(lambda x: full(x, v), t, 1e-5), atol=3e-4)
  np.testing.assert_allclose(np.asarray(gv), fd_grad(lambda x: full(t, x), v, 1e-5), atol=3e-4)
  gt_stop = jax.grad(lambda a: losses.ncl_loss(a, f32(v), scale, tq, vq, **TIGHT)[0])(f32(t))
  assert np.max(np.abs(np.asarray(gt_stop) - np.asarray(gt))) > 1e-3


def test_batch_only_unrolled_gradient_equals_stop_gradient(rng):
  """Without a queue (and the same scale) the converged biases make every batch column sum to
  1, which zeroes d(CE)/d(bias): the gradient through the biases vanishes, so both modes agree."""
  t, v = make_pair(rng, 4, 3)
  loss = lambda mode, n: (lambda a, b: losses.ncl_loss(a, b, 3.0, gradient=mode, tol=1e-6,
                                                       max_iterations=n)[0])
  unrolled = jax.jit(jax.grad(loss("unroll", 300), argnums=(0, 1)))(f32(t), f32(v))
  stopped = jax.jit(jax.grad(loss("stop", 5000), argnums=(0, 1)))(f32(t), f32(v))
  for a, b in zip(unrolled, stopped):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_unrolled_few_iterations_match_numpy_iterations(rng):
  t, v = make_pair(rng, 4, 4)
  got, aux = losses.ncl_loss(f32(t), f32(v), 30.0, gradient="unroll", max_iterations=3)
  np.testing.assert_allclose(float(got), np_ncl(t, v, 30.0, iterations=3), rtol=1e-4)
  assert int(aux["sinkhorn_iterations_t2v"]) == 3


def test_logit_scale_gradient_under_jit(rng):
  """Stop mode differentiates the CE with frozen biases, also with respect to the scale."""
  t, v = make_pair(rng, 4, 5)
  bank_t, bank_v = make_pair(rng, 6, 5)
  tq, vq = make_queue(bank_t, 6, rng), make_queue(bank_v, 6, rng)
  fn = jax.jit(jax.value_and_grad(
      lambda log_s: losses.ncl_loss(f32(t), f32(v), jnp.exp(log_s), tq, vq, **TIGHT)[0]))
  scale, eps = 10.0, 1e-5
  value, grad = fn(jnp.log(scale))
  np.testing.assert_allclose(float(value), np_ncl(t, v, scale, bank_t, bank_v), rtol=1e-4)
  bv = np_sinkhorn_biases(scale * np.concatenate([bank_t, t]) @ v.T)
  bt = np_sinkhorn_biases(scale * np.concatenate([bank_v, v]) @ t.T)
  frozen = lambda s: 0.5 * (np_ce_diag(s * t @ v.T + bv) + np_ce_diag(s * v @ t.T + bt))
  fd_frozen = (frozen(scale * np.exp(eps)) - frozen(scale * np.exp(-eps))) / (2 * eps)
  np.testing.assert_allclose(float(grad), fd_frozen, rtol=1e-3, atol=1e-4)
  # Non-vacuous: the full derivative (biases follow the scale) is different.
  full = lambda s: np_ncl(t, v, s, bank_t, bank_v)
  fd_full = (full(scale * np.exp(eps)) - full(scale * np.exp(-eps))) / (2 * eps)
  assert abs(fd_full - fd_frozen) > 1e-2


# ----------------------------------------------------------------------------------------------
# Dispatcher.


def test_loss_fn_by_name_same_signature_under_jit(rng):
  t, v = make_pair(rng, 4, 5)
  tq = queue_lib.enqueue(queue_lib.init_queue(6, 5), f32(t))
  vq = queue_lib.enqueue(queue_lib.init_queue(6, 5), f32(v))
  want = {
      "infonce": float(losses.infonce_loss(f32(t), f32(v), 20.0)),
      "dsl": float(losses.dsl_loss(f32(t), f32(v), 20.0, temperature=5.0)),
      "ncl": float(losses.ncl_loss(f32(t), f32(v), 20.0, tq, vq, **TIGHT)[0]),
  }
  options = {"infonce": {}, "dsl": {"temperature": 5.0}, "ncl": TIGHT}
  for name in losses.LOSS_NAMES:
    fn = losses.loss_fn_by_name(name, **options[name])
    step = jax.jit(jax.value_and_grad(lambda a, b, s, q1, q2: fn(a, b, s, q1, q2)[0],
                                      argnums=(0, 1)))
    value, (gt, gv) = step(f32(t), f32(v), 20.0, tq, vq)
    np.testing.assert_allclose(float(value), want[name], rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(gt))) and np.all(np.isfinite(np.asarray(gv)))
    _, aux = fn(f32(t), f32(v), 20.0, tq, vq)
    assert "infonce" in aux


def test_user_errors(rng):
  with pytest.raises(errors.UserError, match="unknown loss"):
    losses.loss_fn_by_name("clip")
  with pytest.raises(errors.UserError, match="no option"):
    losses.loss_fn_by_name("infonce", tol=1e-3)
  with pytest.raises(errors.UserError, match="gradient"):
    losses.loss_fn_by_name("ncl", gradient="implicit")
  with pytest.raises(errors.UserError, match="same shape"):
    losses.ncl_loss(jnp.zeros((4, 3)), jnp.zeros((5, 3)), 1.0)
  with pytest.raises(errors.UserError, match="queue embeddings"):
    losses.ncl_loss(jnp.zeros((4, 3)), jnp.zeros((4, 3)), 1.0, queue_lib.init_queue(2, 7))
