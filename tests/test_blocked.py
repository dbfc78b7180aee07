"""Tests for moejax/kernels/blocked.py: the block layout and its three products.

The products' numbers are checked against numpy with every other implementation in
tests/test_grouped_matmul.py and tests/test_grouped_glu.py; here, the layout itself.
"""
from unittest import mock

from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from moejax.kernels import blocked
from moejax.kernels import grouped_matmul as gmm_lib


class BlockLayoutTest(parameterized.TestCase):

  @parameterized.parameters(
      ([5, 0, 7], 12), ([1] * 8, 8), ([0, 0, 30], 30), ([3, 4], 10), ([200, 1, 55, 0], 256),
      ([0, 0], 4))
  def test_used_blocks_cover_each_group_in_order(self, sizes, m):
    lay = blocked.layout(jnp.asarray(sizes, jnp.int32), m)
    start, group = np.asarray(lay.block_start), np.asarray(lay.block_group)
    ends = np.cumsum(sizes)
    used = int(lay.num_used)
    self.assertLessEqual(used, lay.num_blocks)
    self.assertLessEqual(lay.block, m)
    owner = np.full(m, -1)
    for b in range(used):
      rows = np.arange(start[b], min(start[b] + lay.block, ends[group[b]]))
      self.assertGreater(rows.size, 0)  # no empty block is run
      self.assertTrue(np.all(owner[rows] == -1))  # each row in one block
      owner[rows] = group[b]
    # Every row of a group in one of its group's blocks; rows past the sum in none.
    np.testing.assert_array_equal(owner, np.concatenate(
        [np.repeat(np.arange(len(sizes)), sizes), np.full(m - sum(sizes), -1)]))

  def test_block_size_follows_the_mean_group_size(self):
    self.assertEqual(blocked.block_size(8192, 8), 128)  # capped
    self.assertEqual(blocked.block_size(100, 8), 16)
    self.assertEqual(blocked.block_size(20, 8), 8)  # at least 8 ...
    self.assertEqual(blocked.block_size(5, 8), 5)  # ... but no more than the rows

  def test_products_keep_the_dtype_and_zero_rows_outside_groups(self):
    sizes = jnp.array([3, 0, 4], jnp.int32)
    lay = blocked.layout(sizes, 9)
    x = jnp.ones((9, 4), jnp.bfloat16)
    w = jnp.ones((3, 4, 5), jnp.bfloat16)
    y = blocked.gmm(x, w, lay)
    self.assertEqual(y.dtype, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(y[:7], np.float32), 4.0)
    np.testing.assert_array_equal(np.asarray(y[7:], np.float32), 0.0)
    dw = blocked.tgmm(x, jnp.ones((9, 5), jnp.bfloat16), lay, 3)
    np.testing.assert_array_equal(np.asarray(dw, np.float32)[:, 0, 0], [3.0, 0.0, 4.0])

  def test_rows_outside_a_block_add_nothing_even_when_not_finite(self):
    # A block's window reaches into its neighbours' rows and, at the end, rows of no group.
    sizes = jnp.array([5, 6], jnp.int32)
    x = jax.random.normal(jax.random.key(0), (16, 4)).at[11:].set(jnp.inf)
    dy = jax.random.normal(jax.random.key(1), (16, 3)).at[11:].set(jnp.nan)
    w = jax.random.normal(jax.random.key(2), (2, 4, 3))
    lay = blocked.layout(sizes, 16)
    self.assertEqual(lay.block, 8)
    np.testing.assert_allclose(blocked.gmm(x, w, lay)[:11],
                               jax.lax.ragged_dot(x[:11], w, sizes), rtol=1e-6)
    np.testing.assert_allclose(blocked.gmm_t(dy, w, lay)[:11],
                               jax.lax.ragged_dot(dy[:11], jnp.swapaxes(w, 1, 2), sizes),
                               rtol=1e-6)
    np.testing.assert_allclose(
        blocked.tgmm(x, dy, lay, 2),
        jnp.stack([x[:5].T @ dy[:5], x[5:11].T @ dy[5:11]]), rtol=1e-5)

  def test_any_shape_is_served_without_falling_back(self):
    sizes = jnp.array([5, 7], jnp.int32)
    x = jax.random.normal(jax.random.key(0), (12, 4))
    w = jax.random.normal(jax.random.key(1), (2, 4, 3))
    gmm_lib._logged_fallbacks.clear()
    with mock.patch.object(jax.lax, 'ragged_dot', side_effect=AssertionError('fell back')):
      y = gmm_lib.grouped_matmul(x, w, sizes, impl='blocked')
    np.testing.assert_allclose(y, jax.lax.ragged_dot(x, w, sizes), rtol=1e-6)
