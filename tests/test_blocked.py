"""Tests for moejax/kernels/blocked.py: the padded block layout and its three products.

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
      ([5, 0, 7], 12), ([1] * 8, 8), ([0, 0, 30], 30), ([3, 4], 10), ([200, 1, 55, 0], 256))
  def test_rows_fill_blocks_of_their_own_group(self, sizes, m):
    lay = blocked.layout(jnp.asarray(sizes, jnp.int32), m)
    slot, block_group = np.asarray(lay.slot), np.asarray(lay.block_group)
    total = sum(sizes)
    # Rows inside a group get distinct slots in blocks tagged with that group...
    inside = slot[:total]
    self.assertLen(set(inside.tolist()), total)
    self.assertTrue(np.all(inside < lay.num_slots))
    np.testing.assert_array_equal(block_group[inside // lay.block],
                                  np.repeat(np.arange(len(sizes)), sizes))
    # ... in order, each group starting a fresh block; rows past the sum get no slot.
    start = 0
    for size in sizes:
      if size:
        self.assertEqual(slot[start] % lay.block, 0)
        np.testing.assert_array_equal(np.diff(slot[start:start + size]), 1)
      start += size
    np.testing.assert_array_equal(slot[total:], lay.num_slots)
    # `source` inverts `slot`: each row's slot holds that row, every other slot none (m).
    source = np.asarray(lay.source)
    self.assertEqual(source.shape, (lay.num_slots,))
    np.testing.assert_array_equal(source[inside], np.arange(total))
    np.testing.assert_array_equal(np.delete(source, inside), m)

  def test_block_size_follows_the_mean_group_size(self):
    self.assertEqual(blocked.block_size(8192, 8), 128)  # capped
    self.assertEqual(blocked.block_size(100, 8), 16)
    self.assertEqual(blocked.block_size(5, 8), 8)  # at least 8

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

  def test_large_weight_copies_fall_back_to_xla(self):
    self.assertIsNone(blocked.reason(8192, 128, 256, 8, jnp.float32))  # moe_tiny: 9 MiB
    self.assertIn('MiB', blocked.reason(32768, 1024, 2816, 8, jnp.float32))  # moe_small: GiBs
    sizes = jnp.array([5, 7], jnp.int32)
    x = jax.random.normal(jax.random.key(0), (12, 4))
    w = jax.random.normal(jax.random.key(1), (2, 4, 3))
    gmm_lib._logged_fallbacks.clear()
    with mock.patch.object(blocked, '_MAX_WEIGHT_COPY_BYTES', 16):
      with self.assertLogs(level='WARNING') as logs:
        y = gmm_lib.grouped_matmul(x, w, sizes, impl='blocked')
    self.assertIn('blocked forward', logs.output[0])
    self.assertIn('falling back to xla', logs.output[0])
    np.testing.assert_allclose(y, jax.lax.ragged_dot(x, w, sizes), rtol=1e-6)
