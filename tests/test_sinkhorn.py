"""Tests for ncl_jax.sinkhorn against POT, ott-jax, a float64 numpy reference and real scores.

Conversion to the OT libraries: they solve for P = exp((f + g - C) / eps) with probability
marginals. Our logits are L = -C / eps (eps = 1, C = -L), our row sums are 1 and our column sums
n / m, so our plan equals n times theirs.
"""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import ot
from ott.geometry import geometry as ott_geometry
from ott.problems.linear import linear_problem as ott_problem
from ott.solvers.linear import sinkhorn as ott_sinkhorn
import pytest
import scipy.special

from ncl_jax import errors
from ncl_jax import sinkhorn as sk

SOLVERS = ("kernel", "log")
SHAPE = (12, 9)  # most small tests share this shape, so each solver compiles a few times only


def _ones_masks(n, m):
  return dict(row_mask=np.ones(n, bool), col_mask=np.ones(m, bool))


@jax.jit
def _ott_plan(cost, a, b):
  """ott-jax lse-mode Sinkhorn plan for cost C at epsilon 1 (float64 under enable_x64)."""
  geom = ott_geometry.Geometry(cost_matrix=cost, epsilon=1.0)
  out = ott_sinkhorn.Sinkhorn(lse_mode=True, threshold=1e-13, max_iterations=5000)(
      ott_problem.LinearProblem(geom, a=a, b=b))
  return out.matrix, out.converged


def _cosine_logits(rng, n, m, tau, dim=16, clusters=5):
  """Realistic retrieval logits: clustered unit embeddings, cosine / tau (float32)."""
  centres = rng.normal(size=(clusters, dim))
  x = centres[rng.integers(0, clusters, n)] + 0.8 * rng.normal(size=(n, dim))
  y = centres[rng.integers(0, clusters, m)] + 0.8 * rng.normal(size=(m, dim))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  y /= np.linalg.norm(y, axis=1, keepdims=True)
  return ((x @ y.T) / tau).astype(np.float32)


def _plan64(logits, out):
  """Float64 plan exp(L + f + g) from float32 potentials, 0 where the logit is -inf."""
  logits = np.asarray(logits, np.float64)
  f = np.asarray(out.row_potential, np.float64)
  g = np.asarray(out.col_potential, np.float64)
  with np.errstate(invalid="ignore"):
    plan = np.exp(logits + f[:, None] + g[None, :])
  return np.where(np.isfinite(logits), plan, 0.0)


def _marginal_errors(plan, a, b):
  """Relative L1 errors of the row and column sums of ``plan`` against ``a`` and ``b``."""
  total = max(a.sum(), 1e-30)
  return np.abs(plan.sum(1) - a).sum() / total, np.abs(plan.sum(0) - b).sum() / total


def _numpy_unrolled(logits, iterations):
  """Float64 log-domain Sinkhorn with the module's update order (reference, no JAX)."""
  n, m = logits.shape
  log_a, log_b = np.zeros(n), np.full(m, np.log(n / m))
  f, g = np.zeros(n), np.zeros(m)
  for _ in range(iterations):
    f = log_a - scipy.special.logsumexp(logits + g[None, :], axis=1)
    g = log_b - scipy.special.logsumexp(logits + f[:, None], axis=0)
  return f, g


# -------------------------------------------------------------------------------------------
# Independent references.

@pytest.mark.parametrize("tau,seed", [(0.05, 0), (0.1, 1), (0.02, 2)])
def test_plans_match_pot_and_ott(tau, seed):
  n, m = SHAPE
  logits = _cosine_logits(np.random.default_rng(seed), n, m, tau)
  cost = -logits.astype(np.float64)
  a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
  pot_plan, pot_log = ot.sinkhorn(a, b, cost, reg=1.0, method="sinkhorn_log", stopThr=1e-13,
                                  numItermax=100_000, log=True)
  assert pot_log["niter"] < 100_000 - 1, "POT did not converge"
  with jax.enable_x64(True):
    ott_plan, converged = _ott_plan(jnp.asarray(cost), jnp.asarray(a), jnp.asarray(b))
    assert bool(converged) and ott_plan.dtype == jnp.float64
    ott_plan = np.asarray(ott_plan)
  np.testing.assert_allclose(ott_plan, pot_plan, atol=1e-9)  # the two references agree
  for method in SOLVERS:
    out = sk.sinkhorn(jnp.asarray(logits), tol=1e-6, max_iterations=20_000, method=method)
    assert float(out.error) <= 1e-6
    ours = _plan64(logits, out)
    np.testing.assert_allclose(ours, n * pot_plan, atol=1e-5, err_msg=method)
    np.testing.assert_allclose(ours, n * ott_plan, atol=1e-5, err_msg=method)


@pytest.mark.parametrize("method", SOLVERS)
def test_masked_problem_matches_pot_on_the_unmasked_block(method, rng):
  n, m = SHAPE
  logits = _cosine_logits(rng, n, m, tau=0.05)
  logits[0, :3] = -np.inf  # -inf entries inside the block stay zero-mass
  row_mask = np.ones(n, bool)
  row_mask[[3, 7]] = False
  col_mask = np.ones(m, bool)
  col_mask[[1, 8]] = False
  out = sk.sinkhorn(jnp.asarray(logits), row_mask=row_mask, col_mask=col_mask, tol=1e-6,
                    max_iterations=20_000, method=method)
  block = logits[row_mask][:, col_mask].astype(np.float64)
  nb, mb = block.shape
  pot_plan = ot.sinkhorn(np.full(nb, 1 / nb), np.full(mb, 1 / mb), -block, reg=1.0,
                         method="sinkhorn_log", stopThr=1e-13, numItermax=100_000)
  ours = _plan64(logits, out)
  np.testing.assert_allclose(ours[row_mask][:, col_mask], nb * pot_plan, atol=1e-5)
  assert np.all(np.asarray(out.row_potential)[~row_mask] == 0)
  assert np.all(np.asarray(out.col_potential)[~col_mask] == 0)


@pytest.mark.parametrize("method", SOLVERS)
def test_explicit_marginals_match_pot(method, rng):
  n, m = SHAPE
  logits = _cosine_logits(rng, n, m, tau=0.1)
  a = rng.uniform(0.5, 2.0, n)
  b = rng.uniform(0.5, 2.0, m)
  out = sk.sinkhorn(jnp.asarray(logits), row_marginals=jnp.asarray(a, jnp.float32),
                    col_marginals=jnp.asarray(b, jnp.float32), tol=1e-6, max_iterations=20_000,
                    method=method)
  b_balanced = b * a.sum() / b.sum()
  pot_plan = ot.sinkhorn(a / a.sum(), b / b.sum(), -logits.astype(np.float64), reg=1.0,
                         method="sinkhorn_log", stopThr=1e-13, numItermax=100_000)
  ours = _plan64(logits, out)
  np.testing.assert_allclose(ours, a.sum() * pot_plan, atol=1e-5 * a.sum())
  row_err, col_err = _marginal_errors(ours, a, b_balanced)
  assert row_err <= 1.5e-6 and col_err <= 1.5e-6


def test_real_msrvtt_scores_kernel_agrees_with_log(shared_data_dir):
  scores = np.load(shared_data_dir / "msrvtt_cap4video" / "msrvtt_video_matrix.npy")
  logits = jnp.asarray(scores * 100.0)  # CLIP's logit scale, temperature 0.01
  outs = {m: sk.sinkhorn(logits, tol=1e-4, method=m) for m in SOLVERS}
  for method, out in outs.items():
    assert int(out.iterations) < 1000, method
    row_err, col_err = _marginal_errors(_plan64(logits, out), np.ones(1000), np.ones(1000))
    assert row_err <= 1e-4 and col_err <= 2e-6, (method, row_err, col_err)
    assert abs(row_err - float(out.error)) <= 1e-6
  kernel_plan, log_plan = _plan64(logits, outs["kernel"]), _plan64(logits, outs["log"])
  # Both stop within the same 10-iteration check window at tol 1e-4.
  assert abs(int(outs["kernel"].iterations) - int(outs["log"].iterations)) < 10
  np.testing.assert_allclose(kernel_plan, log_plan, atol=2e-4)


# -------------------------------------------------------------------------------------------
# Properties.

_SHAPES = [(1, 7), (9, 1), SHAPE, (31, 17)]


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
@hypothesis.given(
    shape=st.sampled_from(_SHAPES), method=st.sampled_from(SOLVERS),
    log_tau=st.floats(np.log(0.01), np.log(2.0)), seed=st.integers(0, 2**31 - 1),
    row_keep=st.floats(0.3, 1.0), col_keep=st.floats(0.3, 1.0),
    neginf=st.sampled_from([0.0, 0.1, 0.3]),
    tol=st.sampled_from([1e-3, 1e-4, 1e-5]))
def test_marginal_properties(shape, method, log_tau, seed, row_keep, col_keep, neginf, tol):
  rng = np.random.default_rng(seed)
  n, m = shape
  logits = _cosine_logits(rng, n, m, tau=float(np.exp(log_tau)))
  logits[rng.random((n, m)) < neginf] = -np.inf
  row_mask = rng.random(n) < row_keep
  col_mask = rng.random(m) < col_keep
  max_iterations = 300
  out = sk.sinkhorn(jnp.asarray(logits), row_mask=row_mask, col_mask=col_mask, tol=tol,
                    max_iterations=max_iterations, method=method)
  f, g = np.asarray(out.row_potential), np.asarray(out.col_potential)
  assert np.all(np.isfinite(f)) and np.all(np.isfinite(g))
  # Active block, computed independently from the inputs.
  visible = np.where(row_mask[:, None] & col_mask[None, :], logits, -np.inf)
  rows = np.isfinite(visible).any(1)
  cols = np.isfinite(visible).any(0)
  assert np.all(f[~rows] == 0) and np.all(g[~cols] == 0)
  a = rows.astype(np.float64)
  b = np.where(cols, rows.sum() / max(cols.sum(), 1), 0.0)
  row_err, col_err = _marginal_errors(_plan64(visible, out), a, b)
  assert col_err <= 2e-6  # every state the solver returns ends with a column update
  assert abs(row_err - float(out.error)) <= 2e-6 + 1e-3 * row_err
  if int(out.iterations) < max_iterations:
    assert float(out.error) <= tol
  else:
    assert int(out.iterations) == max_iterations
  if neginf == 0 and log_tau >= np.log(0.05):
    # All-finite logits of moderate span: always feasible, converges quickly.
    assert int(out.iterations) < max_iterations


def test_kernel_and_log_agree_on_hard_problems(rng):
  """Wide logit spans push the kernel form into its absorb and log-fallback branches.

  With ``tol=-1`` both solvers run the same 400 iterations, so their potentials must agree.
  """
  n, m = 31, 17
  cases = [
      _cosine_logits(rng, n, m, tau=0.003),  # span ~600 nats: far beyond float32 exp
      np.where(rng.random((n, m)) < 0.5, -np.inf, rng.normal(size=(n, m)) * 30).astype(
          np.float32),
      # Column 1 sits 200 nats below every row maximum: the first kernel column update is
      # rejected and must run in the log domain.
      np.concatenate([np.zeros((n, 1)), np.full((n, 1), -200.0), rng.normal(size=(n, m - 2))],
                     1).astype(np.float32),
  ]
  for logits in cases:
    kernel, log = [sk.sinkhorn(jnp.asarray(logits), tol=-1.0, max_iterations=400, method=method,
                               **_ones_masks(n, m)) for method in SOLVERS]
    assert int(kernel.iterations) == int(log.iterations) == 400
    # Potentials reach ~300 here, where one float32 ulp is 3e-5: hence rtol.
    np.testing.assert_allclose(_plan64(logits, kernel), _plan64(logits, log), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(float(kernel.error), float(log.error), rtol=1e-2, atol=1e-6)
  # The last case converges quickly: both meet a tight tolerance.
  for method in SOLVERS:
    out = sk.sinkhorn(jnp.asarray(cases[-1]), tol=1e-6, max_iterations=400, method=method,
                      **_ones_masks(n, m))
    assert float(out.error) <= 1e-6 and int(out.iterations) < 400


def test_auto_is_the_kernel_solver_and_unroll_matches_log(rng):
  logits = jnp.asarray(_cosine_logits(rng, *SHAPE, tau=0.05))
  auto, kernel = sk.sinkhorn(logits), sk.sinkhorn(logits, method="kernel")
  for x, y in zip(auto, kernel):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  unrolled = sk.sinkhorn(logits, gradient="unroll", max_iterations=7)
  logged = sk.sinkhorn(logits, method="log", tol=0.0, max_iterations=7, check_every=7)
  assert int(unrolled.iterations) == int(logged.iterations) == 7
  np.testing.assert_allclose(unrolled.col_potential, logged.col_potential, atol=1e-6)
  np.testing.assert_allclose(unrolled.error, logged.error, rtol=1e-5)


# -------------------------------------------------------------------------------------------
# Gradients.


def test_unroll_gradient_matches_float64_finite_differences(rng):
  """jax.grad through 6 unrolled float32 updates vs central differences of a numpy reference."""
  n, m, iterations = 4, 3, 6
  logits = rng.normal(size=(n, m)) * 2.0
  weights = rng.normal(size=(n, m))
  col_weights = rng.normal(size=m)

  def loss_np(x):
    f, g = _numpy_unrolled(x, iterations)
    return np.sum(weights * np.exp(x + f[:, None] + g[None, :])) + np.sum(col_weights * g)

  def loss_jax(x):
    out = sk.sinkhorn(x, gradient="unroll", max_iterations=iterations)
    plan = jnp.exp(sk.log_plan(x, out))
    return jnp.sum(weights * plan) + jnp.sum(col_weights * out.col_potential)

  grad = np.asarray(jax.grad(loss_jax)(jnp.asarray(logits, jnp.float32)))
  step = 1e-6
  numeric = np.zeros_like(logits)
  for idx in np.ndindex(n, m):
    bump = np.zeros_like(logits)
    bump[idx] = step
    numeric[idx] = (loss_np(logits + bump) - loss_np(logits - bump)) / (2 * step)
  np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=2e-4)
  assert np.abs(numeric).max() > 1e-2  # the check is not vacuous


def test_stop_gradient_mode_blocks_gradients(rng):
  # Both methods share the stop_gradient at the solver's entry; the log one compiles faster.
  logits = jnp.asarray(_cosine_logits(rng, *SHAPE, tau=0.1))
  grad = jax.grad(lambda x: jnp.sum(sk.sinkhorn(x, method="log").col_potential ** 2))(logits)
  np.testing.assert_array_equal(np.asarray(grad), 0.0)


# -------------------------------------------------------------------------------------------
# Edge cases.


@pytest.mark.parametrize("method", SOLVERS)
def test_huge_logits_stay_finite(method, rng):
  n, m = SHAPE
  logits = (rng.uniform(-1, 1, SHAPE) * 1e4).astype(np.float32)
  logits[3, 5] = 1e4
  logits[:, 7] = -1e4
  out = sk.sinkhorn(jnp.asarray(logits), max_iterations=200, method=method)
  for x in out[:2]:
    assert np.all(np.isfinite(np.asarray(x)))
  assert np.isfinite(float(out.error))
  _, col_err = _marginal_errors(_plan64(logits, out), np.ones(n), np.full(m, n / m))
  assert col_err <= 1e-3  # one float32 ulp of a potential near 1e4 is 1e-3


@pytest.mark.parametrize("method", SOLVERS)
def test_all_neg_inf_rows_and_columns_are_dropped(method, rng):
  n, m = SHAPE
  logits = _cosine_logits(rng, n, m, tau=0.1)
  logits[2, :] = -np.inf
  logits[:, 4] = -np.inf
  logits[5, 1] = -np.inf
  out = sk.sinkhorn(jnp.asarray(logits), tol=1e-6, max_iterations=5000, method=method)
  f, g = np.asarray(out.row_potential), np.asarray(out.col_potential)
  assert f[2] == 0 and g[4] == 0 and np.all(np.isfinite(f)) and np.all(np.isfinite(g))
  rows, cols = np.arange(n) != 2, np.arange(m) != 4
  row_err, col_err = _marginal_errors(_plan64(logits, out), rows * 1.0,
                                      cols * (n - 1) / (m - 1))
  assert row_err <= 1.5e-6 and col_err <= 1.5e-6


@pytest.mark.parametrize("method", SOLVERS)
def test_nothing_left_to_balance(method, rng):
  n, m = SHAPE
  logits = jnp.asarray(_cosine_logits(rng, n, m, tau=0.1))
  for kwargs in [dict(row_mask=np.zeros(n, bool), col_mask=np.ones(m, bool)),
                 dict(row_mask=np.ones(n, bool), col_mask=np.zeros(m, bool)),
                 dict(row_marginals=jnp.zeros(n), col_marginals=jnp.ones(m))]:
    out = sk.sinkhorn(logits, method=method, **kwargs)
    np.testing.assert_array_equal(np.asarray(out.row_potential), 0.0)
    np.testing.assert_array_equal(np.asarray(out.col_potential), 0.0)
    assert float(out.error) == 0.0
  out = sk.sinkhorn(jnp.full(SHAPE, -jnp.inf, jnp.float32), method=method)
  assert float(out.error) == 0.0 and np.all(np.asarray(out.col_potential) == 0)


@pytest.mark.parametrize("method", SOLVERS)
def test_single_row_and_single_column(method, rng):
  row = jnp.asarray(rng.normal(size=(1, 7)) * 10, jnp.float32)
  out = sk.sinkhorn(row, method=method, **_ones_masks(1, 7))
  np.testing.assert_allclose(np.exp(sk.log_plan(row, out)), np.full((1, 7), 1 / 7), rtol=1e-5)
  col = jnp.asarray(rng.normal(size=(9, 1)) * 10, jnp.float32)
  out = sk.sinkhorn(col, method=method, **_ones_masks(9, 1))
  np.testing.assert_allclose(np.exp(sk.log_plan(col, out)), np.ones((9, 1)), rtol=1e-5)
  assert float(out.error) <= 1e-6
  assert int(out.iterations) == (1 if method == "kernel" else 10)  # log checks every 10


def test_bfloat16_inputs_are_solved_in_float32(rng):
  logits = _cosine_logits(rng, *SHAPE, tau=0.05)
  low = jnp.asarray(logits, jnp.bfloat16)
  out = sk.sinkhorn(low)
  ref = sk.sinkhorn(low.astype(jnp.float32))
  assert out.col_potential.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out.col_potential), np.asarray(ref.col_potential))
  assert float(out.error) <= 1e-4


def test_max_iterations_zero_reports_the_starting_state(rng):
  n, m = SHAPE
  logits = jnp.asarray(_cosine_logits(rng, n, m, tau=0.1))
  for method in SOLVERS:
    out = sk.sinkhorn(logits, max_iterations=0, method=method)
    assert int(out.iterations) == 0
    np.testing.assert_array_equal(np.asarray(out.row_potential), 0.0)
    row_err, _ = _marginal_errors(np.exp(np.asarray(logits, np.float64)), np.ones(n), np.ones(m))
    np.testing.assert_allclose(float(out.error), row_err, rtol=1e-5)


@functools.lru_cache(maxsize=1)
def _large_logits(n, m):
  """Cosine / 0.01 logits of random unit embeddings (numpy, so no extra compiles)."""
  rng = np.random.default_rng(n + m)
  x = rng.normal(size=(n, 32)).astype(np.float32)
  y = rng.normal(size=(m, 32)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  y /= np.linalg.norm(y, axis=1, keepdims=True)
  return (x @ y.T) * np.float32(100.0)


@pytest.mark.parametrize("shape", [(65536, 128), (4096, 4096)])
@pytest.mark.parametrize("method", SOLVERS)
def test_large_shapes_few_iterations(shape, method):
  """Training-size shapes: a few iterations only (the benchmark times full solves)."""
  n, m = shape
  logits = _large_logits(n, m)
  out = sk.sinkhorn(jnp.asarray(logits), max_iterations=3, method=method)
  assert int(out.iterations) == 3
  f, g = np.asarray(out.row_potential), np.asarray(out.col_potential)
  assert np.all(np.isfinite(f)) and np.all(np.isfinite(g))
  col_sums = np.exp(logits + f[:, None] + g[None, :]).sum(0, dtype=np.float64)
  np.testing.assert_allclose(col_sums, n / m, rtol=1e-4)
  assert np.isfinite(float(out.error)) and float(out.error) > 0


def test_long_columns_converge_tightly():
  """65536 rows: column sums accumulated in one float32 dot (1e-4 off) would stall the solve."""
  logits = _large_logits(65536, 128)
  out = sk.sinkhorn(jnp.asarray(logits), tol=1e-5, max_iterations=200)
  assert float(out.error) <= 1e-5 and int(out.iterations) < 200
  f, g = np.asarray(out.row_potential), np.asarray(out.col_potential)
  plan = np.exp(logits + f[:, None] + g[None, :]).astype(np.float64)
  row_err, col_err = _marginal_errors(plan, np.ones(65536), np.full(128, 512.0))
  assert row_err <= 1.1e-5 and col_err <= 1e-6


def test_user_errors():
  logits = jnp.zeros((3, 4))
  bad_calls = [
      dict(logits=jnp.zeros(3)),
      dict(logits=logits, gradient="implicit"),
      dict(logits=logits, method="fast"),
      dict(logits=logits, method="kernel", gradient="unroll"),
      dict(logits=logits, row_mask=np.ones(4, bool)),
      dict(logits=logits, col_marginals=jnp.ones(3)),
      dict(logits=logits, max_iterations=-1),
  ]
  for kwargs in bad_calls:
    with pytest.raises(errors.UserError):
      sk.sinkhorn(kwargs.pop("logits"), **kwargs)


@pytest.mark.parametrize("shape", [(65536, 128), (4096, 2048), (1031, 1100), (4099, 1536),
                                   (512, 2048)])
def test_kernel_column_sums_are_float32_accurate(shape, rng):
  """Every branch of the column-sum contraction (reduce, chunked, plain dot) stays ~1e-7."""
  n, m = shape
  k = np.exp(rng.normal(size=shape) * 3 - 9).astype(np.float32)
  u = rng.uniform(0.5, 1.5, n).astype(np.float32)
  exact = u.astype(np.float64) @ k.astype(np.float64)
  got = np.asarray(jax.jit(sk._col_sums)(jnp.asarray(u), jnp.asarray(k)))
  assert np.abs(got - exact).sum() / exact.sum() <= 1e-6
