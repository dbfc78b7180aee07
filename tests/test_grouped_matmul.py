"""Tests for moejax/kernels/grouped_matmul.py and the shape logic of kernels/hopper.py.

Everywhere: 'xla' and 'blocked' match a float64 numpy reference for the forward and both
gradients, through `jax.grad` of a grouped SwiGLU ('hopper' and 'hopper_ws' would fall back to
xla on these float32 operands, so they are not run again under their names; their fallback has
its own test). GPU-only (sm90, the `Gpu*` tests): both Mosaic-GPU kernel families match
`jax.lax.ragged_dot` in bf16 to a relative error < 1e-2. The warp-specialized kernels also run
on CPU under the Mosaic-GPU interpreter (tests/test_hopper_ws.py).
"""
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.kernels import grouped_matmul as gmm_lib
from moejax.kernels import hopper
from moejax.kernels.grouped_matmul import grouped_matmul

ON_HOPPER = hopper.platform_reason() is None
requires_hopper = pytest.mark.skipif(
    not ON_HOPPER, reason='GPU-only test: needs an sm90 (Hopper) GPU, skipped elsewhere')


def make_sizes(m, g, mode, seed=0):
  """Group sizes summing to m (or m - 5 for 'tail': trailing rows outside every group)."""
  rng = np.random.default_rng(seed)
  total = m - 5 if mode == 'tail' else m
  if mode == 'empty':
    p = rng.random(g) * (np.arange(g) % 2 == 1)  # every other group empty, the first too
    p[-1] = 1.0
  elif mode == 'skew':
    p = 1.0 / np.arange(1, g + 1) ** 2  # Zipf-like: group 0 takes most rows
  else:
    p = np.ones(g)
  sizes = np.floor(p / p.sum() * total).astype(np.int32)
  sizes[np.argmax(p)] += total - sizes.sum()
  return sizes


def np_grouped_matmul(x, w, sizes):
  y = np.zeros((x.shape[0], w.shape[2]))
  start = 0
  for g, size in enumerate(sizes):
    y[start:start + size] = x[start:start + size] @ w[g]
    start += size
  return y


def np_weight_grad(x, dy, sizes):
  """dw[g] = x_g^T dy_g for rows sorted into groups of `sizes`."""
  dw = np.zeros((len(sizes), x.shape[1], dy.shape[1]))
  start = 0
  for g, size in enumerate(sizes):
    dw[g] = x[start:start + size].T @ dy[start:start + size]
    start += size
  return dw


def np_swiglu_loss_and_grads(x, wi, wo, sizes, dy):
  """loss = <dy, gmm(silu(gmm(x, wi)), wo)> and its gradients, by hand in float64."""
  h = np_grouped_matmul(x, wi, sizes)
  sig = 1 / (1 + np.exp(-h))
  a = h * sig
  dwo = np_weight_grad(a, dy, sizes)
  da = np_grouped_matmul(dy, np.swapaxes(wo, 1, 2), sizes)
  dh = da * (sig + h * sig * (1 - sig))
  dwi = np_weight_grad(x, dh, sizes)
  dx = np_grouped_matmul(dh, np.swapaxes(wi, 1, 2), sizes)
  loss = np.sum(np_grouped_matmul(a, wo, sizes) * dy)
  return loss, dx, dwi, dwo


class GroupedMatmulTest(parameterized.TestCase):

  @parameterized.product(
      impl=('xla', 'blocked'),
      shape=((23, 5, 7, 8), (40, 8, 8, 1), (300, 6, 5, 3)),
      mode=('balanced', 'empty', 'skew', 'tail'))
  def test_forward_and_grads_match_numpy(self, impl, shape, mode):
    m, k, n, g = shape
    sizes = make_sizes(m, g, mode)
    keys = jax.random.split(jax.random.key(m * k + g), 4)
    x = jax.random.normal(keys[0], (m, k))
    wi = jax.random.normal(keys[1], (g, k, n))
    wo = jax.random.normal(keys[2], (g, n, k))
    dy = jax.random.normal(keys[3], (m, k))
    gs = jnp.asarray(sizes)

    def loss(x, wi, wo):
      y = grouped_matmul(jax.nn.silu(grouped_matmul(x, wi, gs, impl=impl)), wo, gs, impl=impl)
      return jnp.sum(y * dy), y

    (value, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        x, wi, wo)
    ref = [np.asarray(a, np.float64) for a in (x, wi, wo, dy)]
    ref_loss, *ref_grads = np_swiglu_loss_and_grads(ref[0], ref[1], ref[2], sizes, ref[3])
    np.testing.assert_allclose(value, ref_loss, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, ref_grads):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # Rows outside every group are exactly zero, and so are their input gradients.
    total = int(sizes.sum())
    np.testing.assert_array_equal(y[total:], 0.0)
    np.testing.assert_array_equal(grads[0][total:], 0.0)

  def test_matches_ragged_dot_gradients(self):
    sizes = jnp.asarray(make_sizes(30, 4, 'empty'))
    x = jax.random.normal(jax.random.key(0), (30, 6))
    w = jax.random.normal(jax.random.key(1), (4, 6, 5))
    ours = jax.grad(lambda x, w: jnp.sum(grouped_matmul(x, w, sizes) ** 2), (0, 1))(x, w)
    ref = jax.grad(lambda x, w: jnp.sum(jax.lax.ragged_dot(x, w, sizes) ** 2), (0, 1))(x, w)
    chex.assert_trees_all_close(ours, ref, rtol=1e-5, atol=1e-5)

  def test_mixed_dtypes_promote(self):
    x = jnp.ones((4, 3), jnp.bfloat16)
    w = jnp.ones((2, 3, 5), jnp.float32)
    y = grouped_matmul(x, w, jnp.array([1, 3]), impl='xla')
    chex.assert_type(y, jnp.float32)
    np.testing.assert_array_equal(y, 3.0)

  def test_bad_impl_raises(self):
    with self.assertRaisesRegex(ValueError, 'gmm_impl'):
      grouped_matmul(jnp.ones((4, 3)), jnp.ones((2, 3, 5)), jnp.array([2, 2]), impl='cuda')

  def test_bad_shapes_raise(self):
    with self.assertRaisesRegex(ValueError, 'group_sizes'):
      grouped_matmul(jnp.ones((4, 3)), jnp.ones((2, 3, 5)), jnp.array([4]))
    with self.assertRaisesRegex(ValueError, 'x \\[M, K\\]'):
      grouped_matmul(jnp.ones((4, 2)), jnp.ones((2, 3, 5)), jnp.array([2, 2]))

  @parameterized.parameters('hopper', 'hopper_ws')
  def test_hopper_falls_back_with_logged_reason(self, impl):
    if ON_HOPPER:
      self.skipTest('checks the fallback off Hopper')
    gmm_lib._logged_fallbacks.clear()
    with self.assertLogs(level='WARNING') as logs:
      grouped_matmul(jnp.ones((8, 3)), jnp.ones((2, 3, 5)), jnp.array([4, 4]), impl=impl)
      grouped_matmul(jnp.ones((8, 3)), jnp.ones((2, 3, 5)), jnp.array([4, 4]), impl=impl)
    self.assertLen(logs.output, 1)  # once per shape, not once per call
    self.assertIn(f'{impl} forward', logs.output[0])
    self.assertIn('falling back to xla', logs.output[0])
    self.assertEqual(gmm_lib.resolve_impl('auto'), 'blocked')  # the faster one on CPU


class HopperShapeLogicTest(parameterized.TestCase):
  """Pure-Python checks of what the kernels can serve; these run anywhere."""

  @parameterized.parameters('hopper', 'hopper_ws')
  def test_reasons(self, impl):
    for k, n in ((2048, 1408), (1408, 2048), (2048, 4096), (4096, 14336)):
      self.assertIsNone(hopper.gmm_reason(32768, k, n, jnp.bfloat16, impl))
      self.assertIsNone(hopper.gmm_t_reason(32768, k, n, jnp.bfloat16, impl))
      self.assertIsNone(hopper.tgmm_reason(32768, k, n, jnp.bfloat16, impl))
    self.assertIn('float32', hopper.gmm_reason(128, 128, 128, jnp.float32, impl))
    self.assertIn('K=130', hopper.gmm_reason(128, 130, 128, jnp.bfloat16, impl))
    self.assertIn('M=0', hopper.gmm_reason(0, 128, 128, jnp.bfloat16, impl))
    self.assertIsNone(hopper.gmm_reason(128, 1000, 128, jnp.bfloat16, impl))  # pads to 1024

  def test_ws_column_tile_halves_rather_than_pads(self):
    self.assertEqual(hopper.ws_config('gmm', 2048, 4096).cta_n, 256)
    self.assertEqual(hopper.ws_config('gmm', 2048, 1408).cta_n, 128)  # 1408 = 11 x 128
    self.assertEqual(hopper.ws_config('gmm_t', 1408, 2048).cta_n, 128)  # gmm_t writes K columns
    self.assertIn('N=200', hopper.gmm_reason(128, 128, 200, jnp.bfloat16, 'hopper_ws'))

  @parameterized.product(op=('gmm', 'gmm_t', 'tgmm'), k=(64, 192, 1408, 2048, 14336),
                         n=(64, 320, 1408, 4096))
  def test_block_configs_divide_their_dimensions(self, op, k, n):
    cfg = hopper.block_config(op, k, n)
    contraction, out_cols = (n, k) if op == 'gmm_t' else (k, n)
    self.assertEqual(out_cols % cfg.block_n, 0)
    if op == 'tgmm':
      self.assertEqual(k % cfg.block_m, 0)
    else:
      self.assertEqual(contraction % cfg.block_k, 0)

  def test_paired_kernel_reasons(self):
    for d, f in ((2048, 4096), (2048, 1408), (4096, 14336)):
      self.assertIsNone(hopper.glu_reason(32768, d, f, jnp.bfloat16))
      self.assertIsNone(hopper.gmm_t_sum_reason(32768, d, f, jnp.bfloat16))
      self.assertIsNone(hopper.tgmm_pair_reason(32768, d, f, jnp.bfloat16))
    self.assertEqual(hopper.ws_pair_config('gmm', 2048, 1408).tile_n, 128)  # 1408 = 11 x 128
    self.assertEqual(hopper.ws_pair_config('gmm', 2048, 320).tile_n, 64)
    self.assertIn('float32', hopper.glu_reason(128, 128, 128, jnp.float32))
    self.assertIn('N=200', hopper.glu_reason(128, 128, 200, jnp.bfloat16))
    self.assertIn('K=200', hopper.tgmm_pair_reason(128, 200, 128, jnp.bfloat16))  # K % 128
    with self.assertRaisesRegex(ValueError, 'op must be'):
      hopper.ws_pair_config('glu', 128, 128)

  def test_bad_op_or_kernels_raise(self):
    with self.assertRaisesRegex(ValueError, 'op must be'):
      hopper.block_config('matmul', 64, 64)
    with self.assertRaisesRegex(ValueError, 'op must be'):
      hopper.ws_config('matmul', 64, 64)
    with self.assertRaisesRegex(ValueError, 'impl must be'):
      hopper.gmm_reason(128, 128, 128, jnp.bfloat16, 'triton')


def rel_err(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.gpu
@requires_hopper
class GpuHopperKernelTest(parameterized.TestCase):

  @parameterized.product(
      case=(
          (512, 256, 256, 4, 'balanced'),
          (1000, 192, 320, 8, 'empty'),
          (777, 128, 1408, 16, 'skew'),  # rows not a multiple of 8: padded
          (640, 130, 200, 3, 'tail'),    # K, N too odd: falls back to xla
          (4096, 2048, 1408, 64, 'skew'),
          (4096, 2048, 4096, 8, 'balanced'),
      ),
      impl=('hopper', 'hopper_ws'))
  def test_gpu_bf16_matches_ragged_dot(self, case, impl):
    m, k, n, g, mode = case
    sizes = jnp.asarray(make_sizes(m, g, mode))
    keys = jax.random.split(jax.random.key(m), 3)
    x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    w = (jax.random.normal(keys[1], (g, k, n)) / np.sqrt(k)).astype(jnp.bfloat16)
    dy = jax.random.normal(keys[2], (m, n), jnp.bfloat16)
    y, vjp = jax.vjp(lambda x, w: grouped_matmul(x, w, sizes, impl=impl), x, w)
    dx, dw = vjp(dy)
    x32, w32, dy32 = (a.astype(jnp.float32) for a in (x, w, dy))
    ref_y, ref_vjp = jax.vjp(lambda x, w: jax.lax.ragged_dot(x, w, sizes), x32, w32)
    ref_dx, ref_dw = ref_vjp(dy32)
    for got, want in ((y, ref_y), (dx, ref_dx), (dw, ref_dw)):
      self.assertLess(rel_err(got, want), 1e-2)
    total = int(sizes.sum())
    np.testing.assert_array_equal(np.asarray(y[total:], np.float32), 0.0)
    np.testing.assert_array_equal(np.asarray(dx[total:], np.float32), 0.0)
