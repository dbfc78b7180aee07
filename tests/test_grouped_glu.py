"""Tests for moejax/kernels/grouped_glu.py: the gated layer act(x w0) * (x w1) and its custom VJP.

Everywhere: 'xla' and 'blocked' match a float64 numpy reference for the value and all three
gradients, and autodiff of plain `jax.lax.ragged_dot` for GeGLU ('hopper' and 'hopper_ws' would
fall back to separate xla products on these float32 operands, so they are not run again under
their names; their fallback has its own test). GPU-only (sm90, the `Gpu*` tests): the paired
warp-specialized kernels match in bf16.
The paired kernels also run on CPU under the Mosaic-GPU interpreter (tests/test_hopper_ws.py).
"""
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.kernels import grouped_matmul as gmm_lib
from moejax.kernels import hopper
from moejax.kernels.grouped_glu import grouped_glu
from test_grouped_matmul import make_sizes  # tests/ is on sys.path under pytest
from test_grouped_matmul import np_grouped_matmul
from test_grouped_matmul import np_weight_grad

requires_hopper = pytest.mark.skipif(
    hopper.platform_reason() is not None,
    reason='GPU-only test: needs an sm90 (Hopper) GPU, skipped elsewhere')


def np_swiglu_and_grads(x, w0, w1, sizes, cotangent):
  """loss = <c, silu(x w0) * (x w1)> and d/dx, d/dw0, d/dw1, by hand in float64."""
  h0, h1 = np_grouped_matmul(x, w0, sizes), np_grouped_matmul(x, w1, sizes)
  sig = 1 / (1 + np.exp(-h0))
  a = h0 * sig * h1
  dh0 = cotangent * h1 * (sig + h0 * sig * (1 - sig))
  dh1 = cotangent * h0 * sig
  dx = (np_grouped_matmul(dh0, np.swapaxes(w0, 1, 2), sizes)
        + np_grouped_matmul(dh1, np.swapaxes(w1, 1, 2), sizes))
  dw0, dw1 = np_weight_grad(x, dh0, sizes), np_weight_grad(x, dh1, sizes)
  return np.sum(a * cotangent), a, (dx, dw0, dw1)


def random_operands(m, d, f, g, dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(keys[0], (m, d), dtype)
  w0 = (jax.random.normal(keys[1], (g, d, f)) / np.sqrt(d)).astype(dtype)
  w1 = (jax.random.normal(keys[2], (g, d, f)) / np.sqrt(d)).astype(dtype)
  cotangent = jax.random.normal(keys[3], (m, f), dtype)
  return x, w0, w1, cotangent


def value_and_grads(x, w0, w1, sizes, cotangent, activation, impl):
  def loss(x, w0, w1):
    a = grouped_glu(x, w0, w1, sizes, activation, impl=impl)
    return jnp.sum(a.astype(jnp.float32) * cotangent.astype(jnp.float32)), a
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, w0, w1)


class GroupedGluTest(parameterized.TestCase):

  @parameterized.product(impl=('xla', 'blocked'),
                         mode=('balanced', 'empty', 'skew', 'tail'))
  def test_swiglu_matches_numpy(self, impl, mode):
    m, d, f, g = 37, 6, 5, 4
    sizes = make_sizes(m, g, mode)
    x, w0, w1, cotangent = random_operands(m, d, f, g, seed=m + g)
    (value, a), grads = value_and_grads(x, w0, w1, jnp.asarray(sizes), cotangent, jax.nn.silu,
                                        impl)
    ref_value, ref_a, ref_grads = np_swiglu_and_grads(
        *(np.asarray(t, np.float64) for t in (x, w0, w1)), sizes, np.asarray(cotangent))
    np.testing.assert_allclose(value, ref_value, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a, ref_a, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, ref_grads):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    total = int(sizes.sum())
    np.testing.assert_array_equal(a[total:], 0.0)  # rows outside every group
    np.testing.assert_array_equal(grads[0][total:], 0.0)

  def test_geglu_matches_autodiff_of_ragged_dot(self):
    sizes = jnp.asarray(make_sizes(30, 3, 'skew'))
    x, w0, w1, cotangent = random_operands(30, 8, 6, 3, seed=1)
    (_, a), grads = value_and_grads(x, w0, w1, sizes, cotangent, jax.nn.gelu, 'xla')

    def reference(x, w0, w1):
      h = jax.nn.gelu(jax.lax.ragged_dot(x, w0, sizes)) * jax.lax.ragged_dot(x, w1, sizes)
      return jnp.sum(h * cotangent), h

    (_, ref_a), ref_grads = jax.value_and_grad(reference, (0, 1, 2), has_aux=True)(x, w0, w1)
    np.testing.assert_allclose(a, ref_a, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

  def test_bf16_in_bf16_out(self):
    x, w0, w1, _ = random_operands(16, 4, 4, 2, jnp.bfloat16)
    a = grouped_glu(x, w0, w1, jnp.array([9, 7]), jax.nn.silu, impl='xla')
    self.assertEqual(a.dtype, jnp.bfloat16)
    self.assertEqual(a.shape, (16, 4))

  def test_bad_shapes_raise(self):
    x, w0, w1, _ = random_operands(8, 4, 3, 2)
    with self.assertRaisesRegex(ValueError, 'w0, w1 \\[G, D, F\\]'):
      grouped_glu(x, w0, w1[:, :, :2], jnp.array([4, 4]), jax.nn.silu)
    with self.assertRaisesRegex(ValueError, 'group_sizes'):
      grouped_glu(x, w0, w1, jnp.array([8]), jax.nn.silu)
    with self.assertRaisesRegex(ValueError, 'gmm_impl'):
      grouped_glu(x, w0, w1, jnp.array([4, 4]), jax.nn.silu, impl='cuda')

  def test_paired_kernels_fall_back_with_logged_reason(self):
    if hopper.platform_reason() is None:
      self.skipTest('checks the fallback off Hopper')
    gmm_lib._logged_fallbacks.clear()
    x, w0, w1, cotangent = random_operands(8, 4, 3, 2)
    with self.assertLogs(level='WARNING') as logs:
      value_and_grads(x, w0, w1, jnp.array([4, 4]), cotangent, jax.nn.silu, 'hopper_ws')
    paired = [line for line in logs.output if 'separate products' in line]
    self.assertLen(paired, 3)  # the forward and the two gradients, once each
    self.assertIn('hopper_ws glu', paired[0])


@pytest.mark.gpu
@requires_hopper
class GpuHopperGluTest(parameterized.TestCase):

  @parameterized.parameters(
      (4096, 2048, 1408, 64, 'skew'),
      (4096, 1024, 2048, 8, 'balanced'),
      (1000, 192, 320, 8, 'empty'),    # N = 320: 64-wide tiles
      (777, 128, 200, 4, 'tail'),      # F = 200: paired kernels fall back
  )
  def test_gpu_bf16_matches_float32_reference(self, m, d, f, g, mode):
    sizes = jnp.asarray(make_sizes(m, g, mode))
    x, w0, w1, cotangent = random_operands(m, d, f, g, jnp.bfloat16, seed=m)
    (_, a), grads = value_and_grads(x, w0, w1, sizes, cotangent, jax.nn.silu, 'hopper_ws')
    f32 = [t.astype(jnp.float32) for t in (x, w0, w1, cotangent)]
    (_, ref_a), ref_grads = value_and_grads(*f32[:3], sizes, f32[3], jax.nn.silu, 'xla')
    for got, want in zip((a, *grads), (ref_a, *ref_grads)):
      got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
      self.assertLess(np.linalg.norm(got - want) / np.linalg.norm(want), 1e-2)
    total = int(sizes.sum())
    np.testing.assert_array_equal(np.asarray(a[total:], np.float32), 0.0)
