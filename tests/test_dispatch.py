"""Tests for moejax/dispatch.py: the backends agree; capacity drops exactly the right slots."""
import functools
import math

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from moejax import dispatch
from moejax import experts
from moejax.routing import Routing

D, F = 8, 6


def random_routing(num_tokens, num_experts, top_k, seed=0, empty_expert=False,
                   empty_slots=False):
  """Distinct experts per token, gates in (0.1, 1); optionally expert E-1 never chosen, and/or
  about a third of the slots empty (-1, gate 0) as expert choice produces, token 0 with none."""
  rng = np.random.default_rng(seed)
  scores = rng.standard_normal((num_tokens, num_experts))
  if empty_expert:
    scores[:, -1] = -np.inf
  index = np.argsort(-scores, axis=-1)[:, :top_k].astype(np.int32)
  gate = rng.uniform(0.1, 1.0, (num_tokens, top_k)).astype(np.float32)
  if empty_slots:
    empty = rng.uniform(size=index.shape) < 0.35
    empty[0] = True
    index[empty], gate[empty] = -1, 0.0
  return Routing(expert_index=jnp.asarray(index), combine_weight=jnp.asarray(gate), metrics={})


def random_weights(num_experts, seed=1):
  rng = np.random.default_rng(seed)
  shapes = dict(wi_0=(num_experts, D, F), wi_1=(num_experts, D, F), wo=(num_experts, F, D))
  return {k: (0.5 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def run_dispatch(name, x, weights, routing, **kwargs):
  def expert_fn(xs, rows_per_expert=None):
    return experts.expert_ffn(weights['wi_0'], weights['wi_1'], weights['wo'], xs, rows_per_expert)
  num_experts = weights['wi_0'].shape[0]
  return dispatch.dispatch(name, x, routing, expert_fn, num_experts=num_experts, **kwargs)


def np_kept(index, group_size, capacity, priority=None):
  """Reference for the capacity dispatch: which slots of index [T, K] survive. With priority [T]
  (capacity_priority 'score'), each group's tokens are visited by it, highest first."""
  t, k = index.shape
  kept = np.zeros(index.shape, bool)
  for start in range(0, t, group_size):
    group = np.arange(start, start + group_size)
    if priority is not None:
      group = group[np.argsort(-priority[group], kind='stable')]
    used = {}
    for slot in range(k):
      for token in group:
        e = index[token, slot]
        if e >= 0 and used.get(e, 0) < capacity:
          used[e] = used.get(e, 0) + 1
          kept[token, slot] = True
  return kept


class AgreementTest(parameterized.TestCase):

  @parameterized.named_parameters(
      dict(testcase_name='switch_k1', t=16, e=4, k=1),
      dict(testcase_name='top2', t=16, e=4, k=2),
      dict(testcase_name='idle_expert', t=32, e=8, k=2, empty_expert=True),
      dict(testcase_name='fine_grained_e64_k6', t=32, e=64, k=6),
      dict(testcase_name='empty_slots', t=16, e=4, k=4, empty_slots=True),
  )
  def test_backends_agree_with_no_drops(self, t, e, k, empty_expert=False, empty_slots=False):
    routing = random_routing(t, e, k, empty_expert=empty_expert, empty_slots=empty_slots)
    weights = random_weights(e)
    x = np.random.default_rng(2).standard_normal((t, D)).astype(np.float32)
    cotangent = np.random.default_rng(3).standard_normal((t, D)).astype(np.float32)
    kwargs = dict(top_k=k, capacity_factor=float(e), group_size=8)

    @jax.jit
    def outputs_and_grads(x, weights, gate):
      results = {}
      for name in dispatch.DISPATCHES:
        def loss(x, weights, gate, name=name):
          y, dropped = run_dispatch(name, x, weights, routing.replace(combine_weight=gate),
                                    **kwargs)
          return jnp.sum(y * cotangent), (y, dropped)
        grads, (y, dropped) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, weights, gate)
        results[name] = (y, dropped, grads)
      return results

    results = outputs_and_grads(x, weights, routing.combine_weight)
    y_dense, _, grads_dense = results['dense']
    chex.assert_shape(y_dense, (t, D))
    self.assertGreater(float(jnp.max(jnp.abs(y_dense))), 0.0)
    for name in ('capacity', 'ragged'):
      y, dropped, grads = results[name]
      self.assertEqual(float(dropped), 0.0)
      np.testing.assert_allclose(y, y_dense, rtol=1e-5, atol=1e-5, err_msg=name)
      chex.assert_trees_all_close(grads, grads_dense, rtol=1e-5, atol=1e-5)
    if empty_expert:
      for name in dispatch.DISPATCHES:
        np.testing.assert_array_equal(results[name][2][1]['wo'][e - 1], 0.0, err_msg=name)
    if empty_slots:
      no_slot = np.all(np.asarray(routing.expert_index) < 0, axis=-1)
      self.assertTrue(no_slot.any())
      for name in dispatch.DISPATCHES:
        np.testing.assert_array_equal(results[name][0][no_slot], 0.0, err_msg=name)


class CapacityTest(parameterized.TestCase):

  def test_hand_computed_drops(self):
    # One group of 4 tokens, E=3, k=2, factor 0.75: C = ceil(0.75 * 2 * 4 / 3) = 2.
    # Priority: slot 0 of tokens 0..3, then slot 1 of tokens 0..3.
    #   expert 0: t0/s0, t1/s0 kept; t2/s0, t3/s1 dropped.
    #   expert 1: t3/s0, t0/s1 kept; t2/s1 dropped.   expert 2: t1/s1 kept.
    index = np.array([[0, 1], [0, 2], [0, 1], [1, 0]], np.int32)
    expected = np.array([[True, True], [True, True], [False, False], [True, False]])
    self.assertEqual(dispatch.group_capacity(4, 3, 2, 0.75), 2)
    np.testing.assert_array_equal(np_kept(index, 4, 2), expected)
    self._check(index, expected, group_size=4, top_k=2, capacity_factor=0.75)

  def test_fractional_capacity_rounds_up(self):
    # One group of 5 tokens, E=3, k=2, factor 1: 1 · 2 · 5 / 3 = 3.33 slots, so C = 4.
    # Priority: slot 0 of tokens 0..4, then slot 1. Expert 0 is every token's first choice:
    # t0..t3 kept, t4/s0 dropped; expert 1 keeps its four second choices, expert 2 its one.
    index = np.array([[0, 1]] * 4 + [[0, 2]], np.int32)
    expected = np.array([[True, True]] * 4 + [[False, True]])
    self.assertEqual(dispatch.group_capacity(5, 3, 2, 1.0), 4)
    self.assertEqual(dispatch.group_capacity(8, 4, 1, 1.25), 3)  # 2.5 -> 3
    self._check(index, expected, group_size=5, top_k=2, capacity_factor=1.0)

  @parameterized.product(
      [dict(factor=0.5, group_size=8, empty_slots=False),
       dict(factor=1.0, group_size=4, empty_slots=False),
       dict(factor=0.75, group_size=16, empty_slots=True),
       dict(factor=0.6, group_size=8, empty_slots=False)],
      capacity_priority=('position', 'score'))
  def test_random_drops_match_reference(self, factor, group_size, empty_slots, capacity_priority):
    routing = random_routing(32, 4, 2, seed=5, empty_slots=empty_slots)
    index = np.asarray(routing.expert_index)
    priority = np.random.default_rng(6).uniform(size=32).astype(np.float32)
    capacity = min(group_size, math.ceil(factor * 2 * group_size / 4))  # 0.6: 2.4 -> 3
    expected = np_kept(index, group_size, capacity,
                       priority if capacity_priority == 'score' else None)
    self.assertTrue((~expected & (index >= 0)).any())
    if capacity_priority == 'score':  # the order matters: position would keep other slots
      self.assertFalse(np.array_equal(expected, np_kept(index, group_size, capacity)))
    self._check(index, expected, group_size=group_size, top_k=2, capacity_factor=factor,
                gate=routing.combine_weight, priority=priority,
                capacity_priority=capacity_priority)

  def test_score_priority_keeps_the_highest_scores(self):
    # Top-1, every token to expert 0, one group of 8, C = ceil(0.5 · 8 / 2) = 2: 'position' keeps
    # tokens 0 and 1, 'score' the two with the highest priority, wherever they sit.
    index = np.zeros((8, 1), np.int32)
    priority = np.array([0.2, 0.3, 0.9, 0.1, 0.4, 0.8, 0.5, 0.6], np.float32)
    self.assertEqual(dispatch.group_capacity(8, 2, 1, 0.5), 2)
    for capacity_priority, kept_tokens in (('position', [0, 1]), ('score', [2, 5])):
      expected = np.zeros((8, 1), bool)
      expected[kept_tokens] = True
      np.testing.assert_array_equal(
          np_kept(index, 8, 2, priority if capacity_priority == 'score' else None), expected)
      self._check(index, expected, group_size=8, top_k=1, capacity_factor=0.5,
                  priority=priority, num_experts=2, capacity_priority=capacity_priority)

  @parameterized.named_parameters(
      ('unknown', 'gate', None, r"capacity_priority='gate'.*'position', 'score'"),
      ('no_priority', 'score', None, r"capacity_priority='score'.*routing.priority.*None"))
  def test_bad_priority(self, capacity_priority, priority, match):
    with self.assertRaisesRegex(ValueError, match):
      run_dispatch('capacity', jnp.zeros((4, D)), random_weights(4),
                   random_routing(4, 4, 2).replace(priority=priority), top_k=2,
                   capacity_factor=1.0, group_size=4, capacity_priority=capacity_priority)

  def _check(self, index, expected_kept, *, group_size, top_k, capacity_factor, gate=None,
             priority=None, num_experts=None, capacity_priority='position'):
    """y equals the dense reference with the dropped slots' gates zeroed; the drop share too."""
    t, k = index.shape
    e = num_experts or int(index.max()) + 1
    weights = random_weights(e)
    x = np.random.default_rng(2).standard_normal((t, D)).astype(np.float32)
    if gate is None:
      gate = np.random.default_rng(4).uniform(0.1, 1.0, (t, k)).astype(np.float32)
    routing = Routing(expert_index=jnp.asarray(index), combine_weight=jnp.asarray(gate),
                      metrics={}, priority=None if priority is None else jnp.asarray(priority))
    kept_routing = routing.replace(combine_weight=jnp.where(expected_kept, gate, 0.0))

    @jax.jit
    def both(routing, kept_routing):
      kwargs = dict(top_k=top_k, capacity_factor=capacity_factor, group_size=group_size)
      y, dropped = run_dispatch('capacity', x, weights, routing,
                                capacity_priority=capacity_priority, **kwargs)
      y_ref, _ = run_dispatch('dense', x, weights, kept_routing, **kwargs)
      return y, dropped, y_ref

    y, dropped, y_ref = both(routing, kept_routing)
    filled = index >= 0
    self.assertAlmostEqual(float(dropped), np.sum(filled & ~expected_kept) / np.sum(filled),
                           places=6)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)

  def test_group_size_must_divide_tokens(self):
    routing = random_routing(12, 4, 2)
    with self.assertRaisesRegex(ValueError, r'group_size=8.*T=12'):
      jax.eval_shape(functools.partial(
          run_dispatch, 'capacity', top_k=2, capacity_factor=1.0, group_size=8),
          jnp.zeros((12, D)), random_weights(4), routing)

  def test_unknown_dispatch(self):
    with self.assertRaisesRegex(ValueError, r"dispatch='sparse'.*'dense'.*'capacity'.*'ragged'"):
      run_dispatch('sparse', jnp.zeros((4, D)), random_weights(4), random_routing(4, 4, 2),
                   top_k=2, capacity_factor=1.0, group_size=4)
