"""Tests for moejax/routing.py: router maths, aux losses on crafted routings, router variants."""
import functools
import math

from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax import routing

T, D = 16, 8


def tokens(t=T, d=D, seed=0):
  return np.random.default_rng(seed).standard_normal((t, d)).astype(np.float32)


def kernel_like(num_experts, seed=1, scale=0.5):
  return (scale * np.random.default_rng(seed).standard_normal((D, num_experts))).astype(np.float32)


def np_softmax(logits):
  z = np.exp(logits - logits.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


class AuxLossTest(parameterized.TestCase):

  def test_balanced_load_balance_loss_is_one(self):
    # 8 tokens, top-2 over 4 experts: every expert gets 4 of the 16 slots; uniform probs.
    index = jnp.array([[0, 1], [2, 3]] * 4, jnp.int32)
    probs = jnp.full((8, 4), 0.25)
    self.assertAlmostEqual(float(routing.load_balance_loss(probs, index)), 1.0, places=6)

  def test_unbalanced_load_balance_loss_by_hand(self):
    # 4 tokens, top-1, 2 experts: f = (3/4, 1/4); P = mean probs = (0.6, 0.4).
    index = jnp.array([[0], [0], [0], [1]], jnp.int32)
    probs = jnp.array([[0.9, 0.1], [0.7, 0.3], [0.5, 0.5], [0.3, 0.7]])
    expected = 2 * (0.75 * 0.6 + 0.25 * 0.4)  # = 1.1
    self.assertAlmostEqual(float(routing.load_balance_loss(probs, index)), expected, places=6)

  def test_load_balance_loss_gradient_flows_through_probs_only(self):
    index = jnp.array([[0], [0], [0], [1]], jnp.int32)
    probs = jnp.array([[0.9, 0.1], [0.7, 0.3], [0.5, 0.5], [0.3, 0.7]])
    grad = jax.grad(routing.load_balance_loss)(probs, index)
    # d/dP[t, e] of E·Σ f_e·mean_t P = E·f_e / T.
    np.testing.assert_allclose(grad, np.tile([[2 * 0.75 / 4, 2 * 0.25 / 4]], (4, 1)), rtol=1e-6)

  def test_z_loss_by_hand(self):
    logits = jnp.array([[0.0, 0.0], [1.0, 2.0], [-1.0, 3.0]])
    lse = [math.log(2.0), math.log(math.e + math.e**2), math.log(math.exp(-1) + math.exp(3))]
    expected = sum(v * v for v in lse) / 3
    self.assertAlmostEqual(float(routing.router_z_loss(logits)), expected, places=5)

  def test_entropy_by_hand(self):
    probs = jnp.array([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    self.assertAlmostEqual(float(routing.router_entropy(probs)), math.log(2) / 2, places=6)

  def test_expert_fraction_ignores_empty_slots(self):
    index = jnp.array([[0, -1], [2, -1], [2, 1]], jnp.int32)
    fraction = routing.expert_fraction(index, 4)
    np.testing.assert_allclose(fraction, [0.25, 0.25, 0.5, 0.0])
    self.assertAlmostEqual(float(jnp.sum(fraction)), 1.0, places=6)


class TopKIndicesTest(parameterized.TestCase):

  @parameterized.parameters((8, 2), (8, 8), (5, 3), (3, 1))
  def test_same_picks_as_lax_top_k(self, num_experts, k):
    rng = np.random.default_rng(num_experts * 10 + k)
    scores = rng.integers(0, 3, (64, num_experts)).astype(np.float32)  # many ties
    scores[rng.random(scores.shape) < 0.2] = -np.inf
    scores[3, 1] = np.nan
    got = routing.top_k_indices(jnp.asarray(scores), k)
    self.assertEqual(got.dtype, jnp.int32)
    np.testing.assert_array_equal(got, jax.lax.top_k(jnp.asarray(scores), k)[1])


class TopKRouterTest(parameterized.TestCase):

  @parameterized.parameters((4, 1, True), (4, 2, True), (4, 2, False), (64, 6, True))
  def test_matches_numpy(self, num_experts, top_k, normalize):
    router = routing.TopKRouter(num_experts, top_k, normalize_top_k=normalize)
    x = tokens()
    variables = {'params': {'kernel': kernel_like(num_experts)}}
    result = jax.jit(router.apply)(variables, x)
    chex.assert_shape(result.expert_index, (T, top_k))
    chex.assert_shape(result.combine_weight, (T, top_k))
    chex.assert_type([result.expert_index, result.combine_weight], [jnp.int32, jnp.float32])

    abstract = jax.eval_shape(router.init, jax.random.key(0), x)['params']['kernel']
    self.assertEqual(abstract.names, ('embed', None))
    chex.assert_shape(abstract.value, (D, num_experts))
    probs = np_softmax(np.asarray(x, np.float64) @ variables['params']['kernel'])
    expected_index = np.argsort(-probs, axis=-1, kind='stable')[:, :top_k]
    expected_gate = np.take_along_axis(probs, expected_index, -1)
    if normalize:
      expected_gate /= expected_gate.sum(-1, keepdims=True)
    np.testing.assert_array_equal(result.expert_index, expected_index)
    np.testing.assert_allclose(result.combine_weight, expected_gate, rtol=1e-5, atol=1e-6)

    metrics = result.metrics
    chex.assert_shape(metrics['expert_fraction'], (num_experts,))
    fraction = np.bincount(expected_index.ravel(), minlength=num_experts) / expected_index.size
    np.testing.assert_allclose(metrics['expert_fraction'], fraction, rtol=1e-6)
    np.testing.assert_allclose(metrics['load_balance_loss'],
                               num_experts * np.sum(fraction * probs.mean(0)), rtol=1e-5)

  def test_router_runs_in_float32_for_bf16_inputs_and_params(self):
    router = routing.TopKRouter(4, 2, param_dtype=jnp.bfloat16)
    x = tokens().astype(jnp.bfloat16)
    abstract = nn.unbox(jax.eval_shape(router.init, jax.random.key(0), x))
    self.assertEqual(abstract['params']['kernel'].dtype, jnp.bfloat16)
    result = jax.jit(router.apply)({'params': {'kernel': kernel_like(4).astype(jnp.bfloat16)}}, x)
    self.assertEqual(result.combine_weight.dtype, jnp.float32)
    for value in result.metrics.values():
      self.assertEqual(value.dtype, jnp.float32)

  def test_traces_once(self):
    router = routing.TopKRouter(4, 2)
    variables = {'params': {'kernel': kernel_like(4)}}
    apply = jax.jit(chex.assert_max_traces(lambda v, x: router.apply(v, x), n=1))
    for seed in range(3):
      apply(variables, tokens(seed=seed))


class NoiseTest(parameterized.TestCase):

  @parameterized.parameters(
      dict(cls=routing.TopKRouter, jitter_noise=0.5),
      dict(cls=routing.NoisyTopKRouter, jitter_noise=0.0),
  )
  def test_noise_only_in_training(self, cls, jitter_noise):
    router = cls(4, 2, jitter_noise=jitter_noise)
    x = tokens(t=64)
    variables = nn.unbox(jax.eval_shape(router.init, jax.random.key(0), x))
    variables = jax.tree.map(lambda a: kernel_like(4), variables)

    @functools.partial(jax.jit, static_argnums=0)
    def run(train, seed):
      return router.apply(variables, x, train=train, rngs={'router': jax.random.key(seed)})

    # Eval: deterministic, whatever the rng, and the same as a plain top-k router.
    plain = jax.jit(routing.TopKRouter(4, 2).apply)(
        {'params': {'kernel': variables['params']['kernel']}}, x)
    chex.assert_trees_all_close(run(False, 0), run(False, 1), plain)
    # Training: different rngs give different gates.
    self.assertGreater(
        float(jnp.max(jnp.abs(run(True, 0).combine_weight - run(True, 1).combine_weight))), 1e-3)

  def test_noisy_router_has_noise_kernel(self):
    variables = jax.eval_shape(routing.NoisyTopKRouter(4, 2).init, jax.random.key(1), tokens())
    chex.assert_shape(nn.unbox(variables)['params']['noise_kernel'], (D, 4))


class ExpertChoiceTest(parameterized.TestCase):

  # (4, 1, 0.9): 0.9 · 16 / 4 = 3.6 tokens per expert, so 4; (8, 3, 0.6): 3.6 again.
  @parameterized.parameters((4, 1, 1.0), (4, 2, 1.0), (8, 2, 1.25), (4, 2, 100.0), (4, 1, 0.9),
                            (8, 3, 0.6))
  def test_every_expert_gets_exactly_capacity_tokens(self, num_experts, top_k, factor):
    router = routing.ExpertChoiceRouter(num_experts, top_k, capacity_factor=factor)
    x = tokens()
    variables = {'params': {'kernel': kernel_like(num_experts)}}
    result = jax.jit(router.apply)(variables, x)
    capacity = min(T, math.ceil(factor * T * top_k / num_experts))
    self.assertEqual(routing.expert_choice_capacity(T, num_experts, top_k, factor), capacity)
    chex.assert_shape(result.expert_index, (T, num_experts))

    index = np.asarray(result.expert_index)
    gate = np.asarray(result.combine_weight)
    # Slot e holds e or -1; each expert fills exactly `capacity` slots; empty slots have gate 0.
    self.assertTrue(np.all((index == np.arange(num_experts)) | (index == -1)))
    np.testing.assert_array_equal((index >= 0).sum(0), np.full(num_experts, capacity))
    np.testing.assert_array_equal(gate[index < 0], 0.0)

    probs = np_softmax(np.asarray(x, np.float64) @ variables['params']['kernel'])
    for e in range(num_experts):
      chosen = set(np.argsort(-probs[:, e], kind='stable')[:capacity])
      self.assertEqual(set(np.nonzero(index[:, e] >= 0)[0]), chosen)
    np.testing.assert_allclose(gate, np.where(index >= 0, probs, 0.0), rtol=1e-5, atol=1e-7)
    self.assertAlmostEqual(float(result.metrics['load_balance_loss']), 1.0, places=5)


  @parameterized.parameters((4, 1.0), (8, 1.25), (2, 0.5))
  def test_chooses_within_each_group(self, group_size, factor):
    # Each expert takes its top-C tokens of every group of `group_size` consecutive tokens.
    num_experts, top_k = 4, 2
    router = routing.ExpertChoiceRouter(num_experts, top_k, capacity_factor=factor,
                                        group_size=group_size)
    x = tokens()
    variables = {'params': {'kernel': kernel_like(num_experts)}}
    index = np.asarray(jax.jit(router.apply)(variables, x).expert_index)
    capacity = routing.expert_choice_capacity(group_size, num_experts, top_k, factor)
    self.assertEqual(capacity, min(group_size, math.ceil(factor * top_k * group_size / 4)))
    probs = np_softmax(np.asarray(x, np.float64) @ variables['params']['kernel'])
    for start in range(0, T, group_size):
      for e in range(num_experts):
        group_probs = probs[start:start + group_size, e]
        chosen = set(start + np.argsort(-group_probs, kind='stable')[:capacity])
        self.assertEqual(set(start + np.nonzero(index[start:start + group_size, e] >= 0)[0]),
                         chosen)

  def test_group_size_must_divide_tokens(self):
    router = routing.ExpertChoiceRouter(4, 2, group_size=5)
    with self.assertRaisesRegex(ValueError, r'group_size=5.*T=16'):
      router.init(jax.random.key(0), tokens())


def np_group_limited_top_k(scores, num_groups, top_groups, top_k):
  """Reference: per token, the top_groups groups by the sum of their two best scores, then the
  top_k experts among those groups' experts, best first."""
  t, e = scores.shape
  per_group = e // num_groups
  index = np.zeros((t, top_k), np.int64)
  for token in range(t):
    grouped = scores[token].reshape(num_groups, per_group)
    group_score = np.sort(grouped, axis=-1)[:, ::-1][:, :2].sum(-1)
    groups = np.argsort(-group_score, kind='stable')[:top_groups]
    allowed = np.concatenate([g * per_group + np.arange(per_group) for g in groups])
    index[token] = allowed[np.argsort(-scores[token, allowed], kind='stable')[:top_k]]
  return index


class GroupLimitedTest(parameterized.TestCase):

  @parameterized.parameters((16, 4, 2, 3), (16, 8, 1, 2), (8, 4, 3, 4), (12, 3, 1, 2))
  def test_top_k_matches_numpy(self, num_experts, num_groups, top_groups, top_k):
    router = routing.TopKRouter(num_experts, top_k, num_expert_groups=num_groups,
                                top_groups=top_groups)
    x = tokens(t=32)
    variables = {'params': {'kernel': kernel_like(num_experts, scale=1.0)}}
    result = jax.jit(router.apply)(variables, x)
    probs = np_softmax(np.asarray(x, np.float64) @ variables['params']['kernel'])
    expected = np_group_limited_top_k(probs, num_groups, top_groups, top_k)
    np.testing.assert_array_equal(result.expert_index, expected)
    gate = np.take_along_axis(probs, expected, -1)
    np.testing.assert_allclose(result.combine_weight, gate / gate.sum(-1, keepdims=True),
                               rtol=1e-5, atol=1e-6)
    # Each token's experts lie in at most top_groups groups, and the limit changed some choice.
    groups_per_token = [len(set(row // (num_experts // num_groups))) for row in expected]
    self.assertLessEqual(max(groups_per_token), top_groups)
    unlimited = np.argsort(-probs, axis=-1, kind='stable')[:, :top_k]
    self.assertFalse(np.array_equal(np.sort(unlimited, -1), np.sort(expected, -1)))

  def test_aux_free_ranks_groups_by_biased_scores(self):
    num_experts, num_groups, top_groups, top_k = 8, 4, 2, 2
    bias = np.array([0.0, 0.0, 0.3, 0.3, 0.0, 0.0, -0.2, 0.1], np.float32)
    router = routing.AuxFreeRouter(num_experts, top_k, num_expert_groups=num_groups,
                                   top_groups=top_groups)
    x = tokens(t=32)
    variables = {'params': {'kernel': kernel_like(num_experts)},
                 'router_state': {'bias': bias}}
    result = jax.jit(router.apply)(variables, x)
    probs = np_softmax(np.asarray(x, np.float64) @ variables['params']['kernel'])
    expected = np_group_limited_top_k(probs + bias, num_groups, top_groups, top_k)
    np.testing.assert_array_equal(result.expert_index, expected)

  def test_all_groups_is_off(self):
    x = tokens()
    variables = {'params': {'kernel': kernel_like(8)}}
    limited = routing.TopKRouter(8, 2, num_expert_groups=4, top_groups=4).apply(variables, x)
    plain = routing.TopKRouter(8, 2).apply(variables, x)
    chex.assert_trees_all_equal(limited, plain)

  @parameterized.named_parameters(
      ('not_divisible', dict(num_expert_groups=3), r'num_expert_groups=3.*num_experts=8'),
      ('too_many_groups', dict(num_expert_groups=2, top_groups=3),
       r'top_groups=3.*1\.\.num_expert_groups=2'),
      ('top_k_does_not_fit', dict(num_expert_groups=4, top_groups=1),
       r'top_k=3 experts do not fit into top_groups=1 groups of 2'),
  )
  def test_bad_groups(self, fields, match):
    router = routing.TopKRouter(8, 3, **fields)
    with self.assertRaisesRegex(ValueError, match):
      router.init(jax.random.key(0), tokens())

  def test_expert_choice_refuses_groups(self):
    with self.assertRaisesRegex(ValueError, r"num_expert_groups=2.*'expert_choice'"):
      routing.make_router('expert_choice', num_experts=4, top_k=2, num_expert_groups=2,
                          top_groups=1)


class AuxFreeTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.rate = 0.02
    self.router = routing.AuxFreeRouter(4, 1, bias_rate=self.rate)
    # Every input has a large first feature and the kernel maps it to expert 0: 0 is overloaded.
    self.x = tokens(t=64)
    self.x[:, 0] = 3.0
    kernel = kernel_like(4)
    kernel[0] = [0.5, 0.0, 0.0, 0.0]
    state = jax.eval_shape(self.router.init, jax.random.key(0), self.x)['router_state']
    chex.assert_shape(state['bias'], (4,))
    self.variables = {'params': {'kernel': kernel},
                      'router_state': {'bias': np.zeros(4, np.float32)}}

  def test_bias_moves_toward_balance(self):
    step = jax.jit(lambda s: self.router.apply(
        {'params': self.variables['params'], 'router_state': s}, self.x, train=True,
        mutable=['router_state']))
    first, new = step(self.variables['router_state'])
    load0 = np.asarray(first.metrics['expert_fraction'])
    self.assertGreater(load0[0], 0.5)
    # One update: the overloaded expert's bias goes down, the underloaded ones' up.
    np.testing.assert_allclose(new['router_state']['bias'], np.sign(0.25 - load0) * self.rate)
    state = new['router_state']
    for _ in range(30):
      result, new = step(state)
      state = new['router_state']
    load = np.asarray(result.metrics['expert_fraction'])
    self.assertLess(np.abs(load - 0.25).max(), np.abs(load0 - 0.25).max() / 4)
    self.assertLess(float(state['bias'][0]), -0.1)

  def test_top2_gates_are_the_unbiased_probabilities_without_renormalisation(self):
    # The bias decides which experts are picked; the gates are the picked experts' unbiased
    # probabilities, which (normalize_top_k=False) sum to less than 1.
    router = routing.AuxFreeRouter(4, 2, normalize_top_k=False, bias_rate=self.rate)
    x, kernel = tokens(t=32), kernel_like(4)
    bias = np.array([0.3, -0.25, 0.0, 0.1], np.float32)
    result = jax.jit(router.apply)({'params': {'kernel': kernel}, 'router_state': {'bias': bias}},
                                   x)
    probs = np_softmax(np.asarray(x, np.float64) @ kernel)
    chosen = np.argsort(-(probs + bias), axis=-1, kind='stable')[:, :2]
    np.testing.assert_array_equal(result.expert_index, chosen)
    np.testing.assert_allclose(result.combine_weight, np.take_along_axis(probs, chosen, -1),
                               rtol=1e-5)
    unbiased = np.argsort(-probs, axis=-1, kind='stable')[:, :2]
    self.assertTrue((np.sort(chosen, -1) != np.sort(unbiased, -1)).any())  # the bias mattered
    self.assertLess(float(np.asarray(result.combine_weight).sum(-1).max()), 0.99)

  def test_bias_fixed_in_eval_or_when_immutable(self):
    _, new = jax.jit(lambda v: self.router.apply(v, self.x, train=False,
                                                 mutable=['router_state']))(self.variables)
    np.testing.assert_array_equal(new['router_state']['bias'], np.zeros(4))
    # Not mutable: no update (and no error).
    result = jax.jit(lambda v: self.router.apply(v, self.x, train=True))(self.variables)
    chex.assert_shape(result.expert_index, (64, 1))

  def test_bias_gets_no_gradient(self):
    def loss(variables):
      result = self.router.apply(variables, self.x)
      return jnp.sum(result.combine_weight * jnp.arange(64.0)[:, None]) + sum(
          jnp.sum(v) for v in result.metrics.values())

    biased = {'params': self.variables['params'],
              'router_state': {'bias': jnp.array([0.0, 0.3, 0.1, 0.2])}}
    grads = jax.jit(jax.grad(loss))(biased)
    np.testing.assert_array_equal(grads['router_state']['bias'], np.zeros(4))
    self.assertGreater(float(jnp.max(jnp.abs(grads['params']['kernel']))), 0.0)


class MakeRouterTest(parameterized.TestCase):

  @parameterized.parameters(
      ('top_k', routing.TopKRouter), ('noisy_top_k', routing.NoisyTopKRouter),
      ('expert_choice', routing.ExpertChoiceRouter), ('aux_free', routing.AuxFreeRouter))
  def test_names(self, name, cls):
    groups = dict(num_expert_groups=1, top_groups=1) if name == 'expert_choice' else dict(
        num_expert_groups=2, top_groups=2)
    router = routing.make_router(name, num_experts=4, top_k=2, capacity_factor=1.5,
                                 group_size=8, bias_rate=0.1, jitter_noise=0.01, **groups)
    self.assertIsInstance(router, cls)
    self.assertEqual(router.name, 'router')
    self.assertEqual((router.num_experts, router.top_k, router.jitter_noise), (4, 2, 0.01))
    if name == 'expert_choice':
      self.assertEqual((router.capacity_factor, router.group_size), (1.5, 8))
    else:
      self.assertEqual((router.num_expert_groups, router.top_groups), (2, 2))
    if name == 'aux_free':
      self.assertEqual(router.bias_rate, 0.1)

  def test_unknown_name_lists_allowed(self):
    with self.assertRaisesRegex(ValueError, r"router='switch'.*'top_k'.*'noisy_top_k'.*"
                                r"'expert_choice'.*'aux_free'"):
      routing.make_router('switch', num_experts=4, top_k=2)


class RouterDtypeTest(parameterized.TestCase):
  """model.moe.router_dtype: the bf16-router ablation rounds the logits, gates stay float32."""

  def test_bf16_router_rounds_its_logits_and_keeps_float32_outputs(self):
    x = jax.random.normal(jax.random.key(0), (64, 16), jnp.float32)
    router32 = routing.make_router('top_k', num_experts=8, top_k=2)
    router16 = routing.make_router('top_k', num_experts=8, top_k=2, dtype=jnp.bfloat16)
    params = router32.init(jax.random.key(1), x)
    out32, out16 = router32.apply(params, x), router16.apply(params, x)
    self.assertEqual(out16.combine_weight.dtype, jnp.float32)
    self.assertEqual(out16.metrics['router_z_loss'].dtype, jnp.float32)
    gap = np.max(np.abs(np.asarray(out16.combine_weight) - np.asarray(out32.combine_weight)))
    self.assertGreater(gap, 0.0)  # the bf16 rounding shows ...
    self.assertLess(gap, 0.05)    # ... at about bf16's resolution, 2^-8 relative
