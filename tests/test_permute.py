"""Tests for moejax/kernels/permute.py: slot sorting, and gathers whose gradients are gathers."""
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from moejax.kernels import permute

T, D, E, K = 12, 5, 4, 3


def routing(seed, empty=False):
  keys = jax.random.split(jax.random.key(seed), 3)
  # K distinct experts per token, as top-k gives.
  index = jnp.argsort(jax.random.uniform(keys[0], (T, E)), axis=1)[:, :K].astype(jnp.int32)
  if empty:  # expert-choice style empty slots
    index = jnp.where(jax.random.bernoulli(keys[1], 0.3, (T, K)), -1, index)
  weights = jax.random.uniform(keys[2], (T, K))
  return index, jnp.where(index < 0, 0.0, weights)


def plain_unsort_combine(y_sorted, inverse, weights):
  """Reference through plain indexing (its autodiff uses scatter-add)."""
  rows = y_sorted[inverse].reshape(T, K, -1)
  return jnp.einsum('tk,tkd->td', weights, rows)


class PermuteTest(parameterized.TestCase):

  @parameterized.parameters(False, True)
  def test_sort_slots(self, empty):
    index, _ = routing(0, empty)
    order, inverse, sizes = jax.jit(permute.sort_slots, static_argnums=1)(index, E)
    flat = np.asarray(index).reshape(-1)
    key = np.where(flat < 0, E, flat)
    np.testing.assert_array_equal(order, np.argsort(key, kind='stable'))
    np.testing.assert_array_equal(np.asarray(order)[inverse], np.arange(T * K))
    np.testing.assert_array_equal(sizes, [np.sum(flat == e) for e in range(E)])
    # Empty slots come after every group.
    np.testing.assert_array_equal(key[np.asarray(order)[int(sizes.sum()):]], E)

  @parameterized.parameters(False, True)
  def test_gather_rows_value_and_grad(self, empty):
    index, _ = routing(1, empty)
    order, inverse, _ = permute.sort_slots(index, E)
    x = jax.random.normal(jax.random.key(2), (T, D))
    probe = jax.random.normal(jax.random.key(3), (T * K, D))
    ours = lambda x: jnp.sum(permute.gather_rows(x, order, inverse) * probe)
    plain = lambda x: jnp.sum(x[order // K] * probe)
    np.testing.assert_array_equal(permute.gather_rows(x, order, inverse), x[order // K])
    chex.assert_trees_all_close(jax.grad(ours)(x), jax.grad(plain)(x), rtol=1e-6, atol=1e-6)

  @parameterized.parameters(False, True)
  def test_unsort_combine_value_and_grads(self, empty):
    index, weights = routing(4, empty)
    order, inverse, _ = permute.sort_slots(index, E)
    y_sorted = jax.random.normal(jax.random.key(5), (T * K, D))
    probe = jax.random.normal(jax.random.key(6), (T, D))
    ours = lambda y, w: jnp.sum(permute.unsort_combine(y, order, inverse, w) * probe)
    plain = lambda y, w: jnp.sum(plain_unsort_combine(y, inverse, w) * probe)
    chex.assert_trees_all_close(permute.unsort_combine(y_sorted, order, inverse, weights),
                                plain_unsort_combine(y_sorted, inverse, weights),
                                rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(jax.grad(ours, (0, 1))(y_sorted, weights),
                                jax.grad(plain, (0, 1))(y_sorted, weights),
                                rtol=1e-5, atol=1e-5)

  def test_round_trip_of_a_permutation_is_identity(self):
    index, _ = routing(7)
    order, inverse, _ = permute.sort_slots(index, E)
    x = jax.random.normal(jax.random.key(8), (T, D))
    # With gates 1/K the unsort-combine of the sorted copies averages K copies of each token.
    y = permute.unsort_combine(permute.gather_rows(x, order, inverse), order, inverse,
                               jnp.full((T, K), 1.0 / K))
    np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-6)

  def test_backward_has_no_scatter(self):
    index, weights = routing(9)
    order, inverse, _ = permute.sort_slots(index, E)
    x = jax.random.normal(jax.random.key(10), (T, D))

    def loss(x, w):
      return jnp.sum(permute.unsort_combine(permute.gather_rows(x, order, inverse) * 2.0, order,
                                            inverse, w) ** 2)

    hlo = jax.jit(jax.grad(loss, (0, 1))).lower(x, weights).as_text()
    self.assertIn('gather', hlo)
    self.assertNotIn('scatter', hlo)
    plain_hlo = jax.jit(jax.grad(lambda x: jnp.sum(x[order // K] ** 2))).lower(x).as_text()
    self.assertIn('scatter', plain_hlo)  # what the custom VJPs avoid

  def test_bf16_keeps_dtype(self):
    index, weights = routing(11)
    order, inverse, _ = permute.sort_slots(index, E)
    x = jax.random.normal(jax.random.key(12), (T, D)).astype(jnp.bfloat16)
    xs = permute.gather_rows(x, order, inverse)
    y = permute.unsort_combine(xs, order, inverse, weights)
    chex.assert_type([xs, y], jnp.bfloat16)
    dx = jax.grad(lambda x: jnp.sum(permute.gather_rows(x, order, inverse).astype(jnp.float32)))(x)
    chex.assert_type(dx, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(dx, np.float32), K)

  def test_bad_shapes_raise(self):
    order = jnp.arange(T * K)
    with self.assertRaisesRegex(ValueError, 'order'):
      permute.gather_rows(jnp.ones((T + 1, D)), order, order)
    with self.assertRaisesRegex(ValueError, 'order'):
      permute.unsort_combine(jnp.ones((T * K, D)), order[:-1], order[:-1], jnp.ones((T, K)))
    with self.assertRaisesRegex(ValueError, 'y_sorted'):
      permute.unsort_combine(jnp.ones((T * K - 1, D)), order, order, jnp.ones((T, K)))
