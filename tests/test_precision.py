"""Tests for moejax/precision.py: policies, optimizer-state dtypes, fp16 loss scaling."""
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moejax import precision


class PolicyTest(parameterized.TestCase):

  @parameterized.parameters(
      ('fp32', jnp.float32, jnp.float32),
      ('bf16', jnp.float32, jnp.bfloat16),
      ('pure_bf16', jnp.bfloat16, jnp.bfloat16),
      ('fp16', jnp.float32, jnp.float16),
  )
  def test_presets(self, name, param_dtype, compute_dtype):
    policy = precision.get_policy(name)
    self.assertEqual(policy.param_dtype, param_dtype)
    self.assertEqual(policy.compute_dtype, compute_dtype)

  def test_unknown_policy_lists_allowed(self):
    with self.assertRaisesRegex(ValueError, r"policy='fp8'.*'bf16'.*'fp16'.*'fp32'.*'pure_bf16'"):
      precision.get_policy('fp8')

  @parameterized.parameters(
      ('fp32', '', '', jnp.float32, jnp.float32),
      ('fp16', '', '', jnp.float32, jnp.float32),
      ('bf16', '', '', jnp.bfloat16, jnp.float32),
      ('pure_bf16', '', '', jnp.bfloat16, jnp.bfloat16),
      ('pure_bf16', 'float32', '', jnp.float32, jnp.bfloat16),
      ('fp32', '', 'bfloat16', jnp.float32, jnp.bfloat16),
  )
  def test_optimizer_state_dtypes(self, name, mu_override, nu_override, mu, nu):
    self.assertEqual(precision.optimizer_state_dtypes(name, mu_override, nu_override), (mu, nu))

  def test_optimizer_state_dtype_bad_override(self):
    with self.assertRaisesRegex(ValueError, r"mu_dtype='float64'.*allowed"):
      precision.optimizer_state_dtypes('fp32', mu_dtype='float64')

  def test_all_finite(self):
    ok = {'a': jnp.ones((3,)), 'b': [jnp.zeros((2, 2), jnp.bfloat16)]}
    self.assertTrue(bool(precision.all_finite(ok)))
    self.assertTrue(bool(precision.all_finite({})))
    for bad in (jnp.inf, -jnp.inf, jnp.nan):
      tree = {'a': jnp.ones((3,)), 'b': [jnp.array([1.0, bad])]}
      self.assertFalse(bool(precision.all_finite(tree)))


class LossScaleTest(parameterized.TestCase):

  def test_loss_scale_for(self):
    scale = precision.loss_scale_for('fp16', init=1024.0, period=7)
    self.assertIsInstance(scale, precision.DynamicLossScale)
    self.assertEqual(float(scale.scale), 1024.0)
    self.assertEqual(scale.period, 7)
    for name in ('fp32', 'bf16', 'pure_bf16'):
      self.assertIsInstance(precision.loss_scale_for(name), precision.NoOpLossScale)
    with self.assertRaisesRegex(ValueError, 'policy'):
      precision.loss_scale_for('int8')

  def test_scale_and_unscale(self):
    scale = precision.loss_scale_for('fp16', init=8.0)
    self.assertEqual(float(scale.scale_loss(jnp.float32(1.5))), 12.0)
    grads = {'w': jnp.array([8.0, 16.0]), 'b': jnp.array(4.0, jnp.bfloat16)}
    unscaled = scale.unscale(grads)
    np.testing.assert_array_equal(unscaled['w'], [1.0, 2.0])
    self.assertEqual(unscaled['b'].dtype, jnp.bfloat16)
    self.assertEqual(float(unscaled['b']), 0.5)

  def test_noop(self):
    scale = precision.NoOpLossScale()
    self.assertEqual(float(scale.scale), 1.0)
    self.assertEqual(float(scale.scale_loss(jnp.float32(3.0))), 3.0)
    grads = {'w': jnp.array([8.0])}
    self.assertIs(scale.unscale(grads), grads)
    self.assertIs(scale.adjust(jnp.array(False)), scale)

  def test_grows_after_period_finite_steps(self):
    scale = precision.loss_scale_for('fp16', init=4.0, period=3)
    adjust = jax.jit(chex.assert_max_traces(lambda s, f: s.adjust(f), n=1))
    history = []
    for _ in range(7):
      scale = adjust(scale, jnp.array(True))
      history.append((float(scale.scale), int(scale.good_steps)))
    self.assertEqual(history, [(4.0, 1), (4.0, 2), (8.0, 0), (8.0, 1), (8.0, 2), (16.0, 0),
                               (16.0, 1)])

  def test_halves_on_overflow_and_floors_at_one(self):
    scale = precision.DynamicLossScale(jnp.float32(4.0), jnp.int32(2), period=3)
    scale = scale.adjust(jnp.array(False))
    self.assertEqual((float(scale.scale), int(scale.good_steps)), (2.0, 0))
    for _ in range(3):
      scale = scale.adjust(jnp.array(False))
    self.assertEqual(float(scale.scale), 1.0)

  def test_fp16_overflow_skips_update_and_halves(self):
    """A real fp16 backward pass: at scale 2^15 the grads overflow, the step is skipped."""
    params = {'w': jnp.ones((4,), jnp.float32)}
    x = jnp.full((4,), 10.0, jnp.float16)

    def loss_fn(p):
      return jnp.sum((p['w'].astype(jnp.float16) * x) ** 2).astype(jnp.float32)

    def step(p, s):
      grads = jax.grad(lambda q: s.scale_loss(loss_fn(q)))(p)
      finite = precision.all_finite(grads)
      grads = s.unscale(grads)
      new_p = jax.tree.map(lambda a, g: a - 1e-6 * g, p, grads)
      return precision.select_tree(finite, new_p, p), s.adjust(finite), finite

    step = jax.jit(step)
    big = precision.loss_scale_for('fp16', init=2.0**15, period=10)
    new_params, new_scale, finite = step(params, big)
    self.assertFalse(bool(finite))
    chex.assert_trees_all_equal(new_params, params)
    self.assertEqual(float(new_scale.scale), 2.0**14)

    small = precision.loss_scale_for('fp16', init=1.0, period=10)
    new_params, new_scale, finite = step(params, small)
    self.assertTrue(bool(finite))
    self.assertFalse(np.allclose(new_params['w'], params['w']))
    self.assertEqual(int(new_scale.good_steps), 1)



class StochasticRoundTest(parameterized.TestCase):

  @parameterized.parameters('bfloat16', 'float16')
  def test_unbiased_and_only_the_two_neighbours(self, dtype):
    values = np.array([1.0 + 1 / 3, -2.7182817, 3.1e-3, 1e-6], np.float32)
    n = 20_000
    x = jnp.asarray(np.repeat(values, n))
    rounded = np.asarray(precision.stochastic_round(x, dtype, jax.random.key(0))
                         .astype(jnp.float32)).reshape(len(values), n)
    for value, samples in zip(values, rounded):
      lower, upper = self._neighbours(value, dtype)
      self.assertEqual(set(np.unique(samples).tolist()), {lower, upper})
      # The mean of n roundings: standard error <= gap / (2 sqrt(n)); allow 5 of them.
      self.assertAlmostEqual(float(np.mean(samples.astype(np.float64))), float(value),
                             delta=5 * (upper - lower) / (2 * np.sqrt(n)))

  @staticmethod
  def _neighbours(value, dtype):
    """(largest <= value, smallest >= value) representable in dtype, as Python floats."""
    nearest = jnp.asarray(value).astype(dtype)
    toward = jnp.asarray(-jnp.inf if float(nearest) > value else jnp.inf, dtype)
    other = jnp.nextafter(nearest, toward)
    return tuple(sorted((float(nearest), float(other))))

  @parameterized.parameters('bfloat16', 'float16')
  def test_representable_values_and_non_finite_stay(self, dtype):
    x = jnp.array([1.0, -0.5, 0.0, 96.0, jnp.inf, -jnp.inf], jnp.float32)
    out = precision.stochastic_round(x, dtype, jax.random.key(1))
    self.assertEqual(out.dtype, jnp.dtype(dtype))
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), np.asarray(x))
    self.assertTrue(bool(jnp.isnan(precision.stochastic_round(jnp.array([jnp.nan]), dtype,
                                                              jax.random.key(2)))[0]))

  def test_rejects_other_dtypes(self):
    with self.assertRaisesRegex(ValueError, r'dtype=int8; allowed values: bfloat16, float16'):
      precision.stochastic_round(jnp.ones(2), jnp.int8, jax.random.key(0))

  def test_small_updates_move_a_bf16_parameter_only_when_rounded_stochastically(self):
    """1.0 + 1e-3, a thousand times: 1e-3 is below half a bf16 ulp at 1 (2^-8)."""
    @jax.jit
    def run(key):
      def body(i, params):
        step_key = None if key is None else jax.random.fold_in(key, i)
        return precision.apply_updates(params, {'w': jnp.float32(1e-3)}, step_key)
      return jax.lax.fori_loop(0, 1000, body, {'w': jnp.ones((), jnp.bfloat16)})['w']

    nearest = jax.jit(lambda: jax.lax.fori_loop(
        0, 1000, lambda i, p: precision.apply_updates(p, {'w': jnp.float32(1e-3)}),
        {'w': jnp.ones((), jnp.bfloat16)})['w'])()
    self.assertEqual(float(nearest), 1.0)
    stochastic = run(jax.random.key(0))
    self.assertEqual(stochastic.dtype, jnp.bfloat16)
    # Expected 2.0; the random walk's standard deviation is about 0.08.
    self.assertAlmostEqual(float(stochastic), 2.0, delta=0.3)

  def test_apply_updates_leaves_float32_and_matches_optax_without_a_key(self):
    params = {'w': jnp.array([1.0, 2.0], jnp.float32), 'b': jnp.array([1.0], jnp.bfloat16)}
    updates = {'w': jnp.array([1e-9, -1e-3]), 'b': jnp.array([1e-3], jnp.bfloat16)}
    keyed = precision.apply_updates(params, updates, jax.random.key(0))
    np.testing.assert_array_equal(keyed['w'], params['w'] + updates['w'])
    self.assertEqual(keyed['b'].dtype, jnp.bfloat16)
    chex.assert_trees_all_equal(precision.apply_updates(params, updates),
                                optax.apply_updates(params, updates))
