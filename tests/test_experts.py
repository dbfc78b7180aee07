"""Tests for moejax/experts.py: stacked experts (einsum and grouped paths) and the gated FFN."""
from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax import experts

E, D, F = 4, 8, 6


def np_act(name, z):
  if name == 'swiglu':
    return z / (1 + np.exp(-z))
  # tanh-approximated GELU, as nn.gelu.
  return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))


def np_ffn(name, x, wi_0, wi_1, wo):
  return (np_act(name, x @ wi_0) * (x @ wi_1)) @ wo


def random_normal(shape, seed=0, scale=1.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def init_experts(module, x, *args):
  """Variables shaped like module.init's, filled by numpy (no XLA compile for the init), and
  float64 copies of the params for the reference."""
  abstract = nn.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), x, *args)))
  rng = np.random.default_rng(1)
  variables = jax.tree.map(
      lambda a: (0.4 * rng.standard_normal(a.shape)).astype(a.dtype), abstract)
  params = {k: np.asarray(v, np.float64) for k, v in variables['params'].items()}
  return variables, params


class ExpertsTest(parameterized.TestCase):

  @parameterized.product(activation=('swiglu', 'gelu'), grouped_input=(False, True))
  def test_einsum_path_matches_numpy(self, activation, grouped_input):
    module = experts.Experts(E, F, activation=activation)
    shape = (2, E, 3, D) if grouped_input else (E, 3, D)
    x = random_normal(shape)
    variables, p = init_experts(module, x)
    y = jax.jit(module.apply)(variables, x)
    chex.assert_shape(y, shape)
    x64 = np.asarray(x, np.float64)
    for e in range(E):
      expected = np_ffn(activation, x64[..., e, :, :], p['wi_0'][e], p['wi_1'][e], p['wo'][e])
      np.testing.assert_allclose(y[..., e, :, :], expected, rtol=1e-5, atol=1e-5)

  def test_grouped_path_matches_per_expert(self):
    module = experts.Experts(E, F)
    rows_per_expert = jnp.array([3, 0, 4, 2], jnp.int32)  # expert 1 gets nothing; 3 padding rows
    x = random_normal((12, D))
    variables, p = init_experts(module, x, rows_per_expert)
    y = jax.jit(module.apply)(variables, x, rows_per_expert)
    chex.assert_shape(y, (12, D))
    x64 = np.asarray(x, np.float64)
    start = 0
    for e, size in enumerate(np.asarray(rows_per_expert)):
      rows = slice(start, start + size)
      np.testing.assert_allclose(
          y[rows], np_ffn('swiglu', x64[rows], p['wi_0'][e], p['wi_1'][e], p['wo'][e]),
          rtol=1e-5, atol=1e-5)
      start += size
    np.testing.assert_array_equal(y[start:], 0.0)

  def test_params_shapes_names_and_dtypes(self):
    module = experts.Experts(E, F, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    x = jnp.ones((E, 2, D))
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    boxed = variables['params']
    self.assertEqual(boxed['wi_0'].names, ('expert', 'embed', 'mlp'))
    self.assertEqual(boxed['wi_1'].names, ('expert', 'embed', 'mlp'))
    self.assertEqual(boxed['wo'].names, ('expert', 'mlp', 'embed'))
    params = nn.unbox(variables)['params']
    chex.assert_shape([params['wi_0'], params['wi_1'], params['wo']],
                      [(E, D, F), (E, D, F), (E, F, D)])
    chex.assert_type(list(params.values()), jnp.bfloat16)
    self.assertEqual(jax.eval_shape(module.apply, variables, x).dtype, jnp.bfloat16)

  def test_bf16_compute_with_fp32_params(self):
    module = experts.Experts(E, F, dtype=jnp.bfloat16)
    x = jnp.ones((E, 2, D))
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    chex.assert_type(list(nn.unbox(variables)['params'].values()), jnp.float32)
    self.assertEqual(jax.eval_shape(module.apply, variables, x).dtype, jnp.bfloat16)

  def test_fine_grained(self):
    module = experts.Experts(64, 4)
    rows_per_expert = jnp.zeros((64,), jnp.int32).at[::3].set(1)  # 22 rows, most experts empty
    x = random_normal((24, D))
    variables, p = init_experts(module, x, rows_per_expert)
    y = jax.jit(module.apply)(variables, x, rows_per_expert)
    x64 = np.asarray(x, np.float64)
    for row, e in enumerate(range(0, 64, 3)):
      np.testing.assert_allclose(
          y[row], np_ffn('swiglu', x64[row], p['wi_0'][e], p['wi_1'][e], p['wo'][e]),
          rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y[22:], 0.0)

  def test_bad_input_rank(self):
    wi = jnp.ones((E, D, F))
    with self.assertRaisesRegex(ValueError, r'\[E, C, D\] or \[G, E, C, D\]'):
      experts.expert_ffn(wi, wi, jnp.ones((E, F, D)), jnp.ones((2, 2, E, 3, D)))


class GatedFFNTest(parameterized.TestCase):

  @parameterized.parameters('swiglu', 'gelu')
  def test_matches_numpy(self, activation):
    module = experts.GatedFFN(F, activation=activation)
    x = random_normal((2, 3, D))
    variables, p = init_experts(module, x)
    y = jax.jit(module.apply)(variables, x)
    chex.assert_shape(y, (2, 3, D))
    expected = np_ffn(activation, np.asarray(x, np.float64), p['wi_0'], p['wi_1'], p['wo'])
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    boxed = jax.eval_shape(module.init, jax.random.key(0), x)['params']
    self.assertEqual([boxed[n].names for n in ('wi_0', 'wi_1', 'wo')],
                     [('embed', 'mlp'), ('embed', 'mlp'), ('mlp', 'embed')])

  @parameterized.parameters(experts.Experts(E, F, activation='relu'),
                            experts.GatedFFN(F, activation='relu'))
  def test_unknown_activation(self, module):
    with self.assertRaisesRegex(ValueError, r"activation='relu'.*'gelu'.*'swiglu'"):
      jax.eval_shape(module.init, jax.random.key(0), jnp.ones((E, 2, D)))
