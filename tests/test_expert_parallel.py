"""Expert parallelism on 8 fake CPU devices equals the single-device MoE: outputs, aux, gradients."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl.testing import parameterized

from moejax import dispatch as dispatch_lib
from moejax import expert_parallel
from moejax import experts as experts_lib
from moejax import model as model_lib
from moejax import precision
from moejax import sharding
from moejax.moe import MoE
from moejax.routing import Routing
from test_sharding import load_config

E, D, F, K = 8, 8, 16, 2
B, S = 8, 8

RULES = (
    ('batch', ('data', 'fsdp', 'expert')),
    ('length', None),
    ('embed', 'fsdp'),
    ('mlp', 'model'),
    ('expert', 'expert'),
)

# (data, fsdp, expert, model) on the first data*fsdp*expert*model devices.
MESHES = dict(
    e2=(1, 1, 2, 1), e4=(1, 1, 4, 1), e8=(1, 1, 8, 1),
    d2e2=(2, 1, 2, 1), d2e4=(2, 1, 4, 1), f2e4=(1, 2, 4, 1), e4m2=(1, 1, 4, 2),
)


def make_mesh(name, rules=RULES):
  data, fsdp, expert, model = MESHES[name]
  config = ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, expert=expert, model=model,
                                          rules=rules))
  mesh = sharding.make_mesh(config, jax.devices()[:data * fsdp * expert * model])
  return mesh, sharding.logical_rules(config)


def assert_close(actual, expected, rtol=2e-5):
  """Tree-wise: every leaf within rtol of the leaf's largest magnitude (fp32 reduction order)."""
  def one(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    chex.assert_equal_shape((a, b))
    scale = max(np.abs(b).max(initial=0.0), 1e-3)
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * scale)
  jax.tree.map(one, actual, expected)


def random_case(seed, router='top_k'):
  """Weights, tokens [B·S, D] and a routing in which expert E-1 receives no token."""
  keys = jax.random.split(jax.random.key(seed), 5)
  scale = D ** -0.5
  weights = dict(wi_0=scale * jax.random.normal(keys[0], (E, D, F)),
                 wi_1=scale * jax.random.normal(keys[1], (E, D, F)),
                 wo=F ** -0.5 * jax.random.normal(keys[2], (E, F, D)))
  x = jax.random.normal(keys[3], (B * S, D))
  logits = jax.random.normal(keys[4], (B * S, E)).at[:, E - 1].set(-1e9)
  probs = jax.nn.softmax(logits)
  if router == 'top_k':
    gate, index = jax.lax.top_k(probs, K)
    gate = gate / gate.sum(-1, keepdims=True)
  else:  # expert choice: each expert takes its top C tokens; K = E slots, -1 where not taken.
    capacity = B * S * K // E
    _, tokens = jax.lax.top_k(probs.T, capacity)  # [E, C]
    taken = jnp.zeros((B * S, E), bool).at[tokens, jnp.arange(E)[:, None]].set(True)
    index = jnp.where(taken, jnp.arange(E), -1)
    gate = jnp.where(taken, probs, 0.0)
  return weights, x, index.astype(jnp.int32), gate


class DispatchTest(parameterized.TestCase):
  """expert_parallel.dispatch against moejax.dispatch.dispatch with the same expert maths."""

  @parameterized.named_parameters(
      ('ragged_e2', 'ragged', 'e2'),
      ('ragged_e8', 'ragged', 'e8'),
      ('ragged_d2e4', 'ragged', 'd2e4'),
      ('ragged_f2e4', 'ragged', 'f2e4'),
      ('capacity_e4', 'capacity', 'e4'),
      ('capacity_d2e2', 'capacity', 'd2e2'),
      ('capacity_e4m2', 'capacity', 'e4m2'),
  )
  def test_matches_single_device(self, name, mesh):
    self._check(mesh, name, capacity_factor=1.0, router='top_k')

  @parameterized.named_parameters(
      ('dense', 'e4', 'dense', 1.0, 'top_k'),
      ('capacity_expert_choice', 'd2e2', 'capacity', 1.0, 'expert_choice'),
  )
  def test_other_dispatch_and_routers(self, mesh, name, capacity_factor, router):
    self._check(mesh, name, capacity_factor, router)

  def _check(self, mesh_name, name, capacity_factor, router):
    weights, x, index, gate = random_case(0, router)
    kwargs = dict(num_experts=E, top_k=K, capacity_factor=capacity_factor, group_size=S)

    def reference(x, gate, weights):
      fn = functools.partial(experts_lib.expert_ffn, weights['wi_0'], weights['wi_1'],
                             weights['wo'])
      return dispatch_lib.dispatch(name, x, Routing(index, gate, {}), fn, **kwargs)

    def parallel(x, gate, weights):
      return expert_parallel.dispatch(name, x, Routing(index, gate, {}), weights,
                                      expert_axis='expert', **kwargs)

    def value_and_grads(fn):
      def loss(x, gate, weights):
        y, dropped = fn(x, gate, weights)
        return jnp.sum(jnp.sin(y)), (y, dropped)
      return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

    expected = value_and_grads(reference)(x, gate, weights)
    mesh, rules = make_mesh(mesh_name)
    with sharding.mesh_context(mesh, rules):
      actual = value_and_grads(parallel)(x, gate, weights)
    (_, (y, dropped)), grads = actual
    chex.assert_shape(y, (B * S, D))
    assert_close(actual, expected)
    if name == 'capacity' and router == 'top_k':
      self.assertGreater(float(dropped), 0.0)  # the case exercises dropping, identically.


class MoELayerTest(parameterized.TestCase):
  """MoE(expert_axis='expert') under a mesh equals MoE() on one device."""

  @parameterized.named_parameters(
      ('ragged_d2e4', 'ragged', 'top_k', 'd2e4'),
      ('capacity_e8', 'capacity', 'top_k', 'e8'),
      ('capacity_f2e4', 'capacity', 'top_k', 'f2e4'),
      ('expert_choice_d2e2', 'ragged', 'expert_choice', 'd2e2'),
  )
  def test_matches_single_device(self, dispatch, router, mesh_name):
    layer = dict(num_experts=E, top_k=K, d_ff=F, dispatch=dispatch, router=router,
                 capacity_factor=1.0, num_shared_experts=1)
    x = jax.random.normal(jax.random.key(1), (B, S, D))
    variables = MoE(**layer).init(jax.random.key(2), x)

    def value_and_grads(module):
      def loss(params, x):
        y, aux = module.apply({'params': params}, x)
        return jnp.sum(jnp.sin(y)) + aux['load_balance_loss'] + aux['router_z_loss'], (y, aux)
      return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

    params = nn.unbox(variables['params'])
    expected = value_and_grads(MoE(**layer))(params, x)
    mesh, rules = make_mesh(mesh_name)
    with sharding.mesh_context(mesh, rules):
      shardings = sharding.tree_shardings(variables['params'], mesh, rules)
      params_sharded = jax.device_put(params, shardings)
      actual = value_and_grads(MoE(**layer, expert_axis='expert'))(params_sharded, x)
    self.assertEqual(params_sharded['experts']['wo'].sharding.spec[0], 'expert')
    assert_close(actual, expected)

  def test_aux_free_router_state_update(self):
    layer = dict(num_experts=E, top_k=K, d_ff=F, router='aux_free', aux_free_bias_rate=0.1)
    x = jax.random.normal(jax.random.key(3), (B, S, D))
    variables = nn.unbox(MoE(**layer).init(jax.random.key(4), x))

    def step(module):
      return jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=['router_state']))

    expected = step(MoE(**layer))(variables, x)
    mesh, rules = make_mesh('d2e4')
    with sharding.mesh_context(mesh, rules):
      actual = step(MoE(**layer, expert_axis='expert'))(variables, x)
    assert_close(actual, expected)
    self.assertGreater(float(np.abs(expected[1]['router_state']['router']['bias']).max()), 0.0)


class ModelTest(parameterized.TestCase):

  def test_model_is_expert_parallel_under_an_expert_mesh(self):
    config = load_config('moe_tiny', 'smoke')
    model = model_lib.build_model(config.model, precision.get_policy('fp32'))
    tokens = jnp.zeros((B, S), jnp.int32)
    variables = model.init(jax.random.key(0), tokens)
    apply = lambda v, t: model.apply(v, t)[0]
    self.assertNotIn('all_to_all', str(jax.make_jaxpr(apply)(variables, tokens)))
    mesh, rules = make_mesh('d2e4')
    with sharding.mesh_context(mesh, rules):
      self.assertEqual(expert_parallel.context_expert_axis(), 'expert')
      self.assertIn('all_to_all', str(jax.make_jaxpr(apply)(variables, tokens)))
    self.assertIsNone(expert_parallel.context_expert_axis())


class ErrorTest(parameterized.TestCase):

  def _call(self, mesh_name=None, rules=RULES, num_experts=E):
    weights, x, index, gate = random_case(0)
    weights = jax.tree.map(lambda w: w[:num_experts], weights)
    fn = functools.partial(expert_parallel.dispatch, 'ragged', x, Routing(index, gate, {}),
                           weights, expert_axis='expert', num_experts=num_experts, top_k=K,
                           capacity_factor=1.0, group_size=S)
    if mesh_name is None:
      return fn()
    mesh, rules = make_mesh(mesh_name, rules)
    with sharding.mesh_context(mesh, rules):
      return fn()

  def test_needs_mesh(self):
    with self.assertRaisesRegex(ValueError, 'needs a mesh'):
      self._call()

  def test_tokens_must_split_over_expert_axis(self):
    with self.assertRaisesRegex(ValueError, "must split the tokens.*'data'"):
      self._call('e4', rules=(('batch', 'data'), ('expert', 'expert')))

  def test_experts_divisible(self):
    with self.assertRaisesRegex(ValueError, r'num_experts=6 .*\(4\)'):
      self._call('e4', num_experts=6)


if __name__ == '__main__':
  pytest.main([__file__])
