"""Expert parallelism on 8 fake CPU devices equals one device: outputs, aux, gradients."""
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
from moejax import routing as routing_lib
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
    d2e2=(2, 1, 2, 1), d2e4=(2, 1, 4, 1), f2e2m2=(1, 2, 2, 2),
    d2=(2, 1, 1, 1), d8=(8, 1, 1, 1),  # data parallel: every expert on every device
    one=(1, 1, 1, 1),
)


def make_mesh(name, rules=RULES):
  data, fsdp, expert, model = MESHES[name]
  config = ml_collections.ConfigDict(dict(member=1, data=data, fsdp=fsdp, expert=expert, model=model,
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
  """Weights, tokens [B·S, D] and a routing in which expert E-1 receives no token.

  Drawn with numpy: test data then costs no XLA compilation.
  """
  rng = np.random.default_rng(seed)
  weights = dict(wi_0=D ** -0.5 * rng.standard_normal((E, D, F), np.float32),
                 wi_1=D ** -0.5 * rng.standard_normal((E, D, F), np.float32),
                 wo=F ** -0.5 * rng.standard_normal((E, F, D), np.float32))
  x = rng.standard_normal((B * S, D), np.float32)
  logits = rng.standard_normal((B * S, E), np.float32)
  logits[:, E - 1] = -1e9
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  if router == 'top_k':
    index = np.argsort(-probs, axis=-1, kind='stable')[:, :K]
    gate = np.take_along_axis(probs, index, axis=-1)
    gate /= gate.sum(-1, keepdims=True)
  else:  # expert choice: each expert takes its top C tokens; K = E slots, -1 where not taken.
    tokens = np.argsort(-probs.T, axis=-1, kind='stable')[:, :B * S * K // E]  # [E, C]
    taken = np.zeros((B * S, E), bool)
    taken[tokens, np.arange(E)[:, None]] = True
    index = np.where(taken, np.arange(E), -1)
    gate = np.where(taken, probs, 0.0).astype(np.float32)
  return weights, x, index.astype(np.int32), gate


def random_variables(module, x, seed):
  """(boxed abstract variables, concrete unboxed variables) of `module`, drawn with numpy."""
  abstract = jax.eval_shape(module.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def draw(leaf):
    return (rng.standard_normal(leaf.shape, np.float32) * leaf.shape[-2] ** -0.5
            if leaf.ndim >= 2 else np.zeros(leaf.shape, leaf.dtype))
  return abstract, jax.tree.map(draw, nn.unbox(abstract))


def dispatch_value_and_grads(fn):
  """jit(value_and_grad) of sum(sin(y)) in tokens, gates and expert weights; aux = y, dropped."""
  def loss(x, gate, weights):
    y, dropped = fn(x, gate, weights)
    return jnp.sum(jnp.sin(y)), (y, dropped)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


@functools.cache
def single_device_dispatch(name, capacity_factor, router):
  """The one-device result of a DispatchTest case (shared by the meshes that check against it)."""
  weights, x, index, gate = random_case(0, router)

  def reference(x, gate, weights):
    fn = functools.partial(experts_lib.expert_ffn, weights['wi_0'], weights['wi_1'], weights['wo'])
    return dispatch_lib.dispatch(name, x, Routing(index, gate, {}), fn, num_experts=E, top_k=K,
                                 capacity_factor=capacity_factor, group_size=S)
  return jax.device_get(dispatch_value_and_grads(reference)(x, gate, weights))


class DispatchTest(parameterized.TestCase):
  """expert_parallel.dispatch against moejax.dispatch.dispatch with the same expert maths."""

  @parameterized.named_parameters(
      ('ragged_e2', 'e2', 'ragged', 'top_k'),
      ('ragged_e8', 'e8', 'ragged', 'top_k'),
      ('ragged_expert_choice_d2e4', 'd2e4', 'ragged', 'expert_choice'),
      ('capacity_d2e2', 'd2e2', 'capacity', 'top_k'),
      ('dense_e4', 'e4', 'dense', 'top_k'),
      ('capacity_expert_choice_d2e2', 'd2e2', 'capacity', 'expert_choice'),
  )
  def test_matches_single_device(self, mesh_name, name, router):
    weights, x, index, gate = random_case(0, router)

    def parallel(x, gate, weights):
      return expert_parallel.dispatch(name, x, Routing(index, gate, {}), weights,
                                      expert_axis='expert', num_experts=E, top_k=K,
                                      capacity_factor=1.0, group_size=S)

    mesh, rules = make_mesh(mesh_name)
    with sharding.mesh_context(mesh, rules):
      actual = dispatch_value_and_grads(parallel)(x, gate, weights)
    (_, (y, dropped)), _ = actual
    chex.assert_shape(y, (B * S, D))
    assert_close(actual, single_device_dispatch(name, 1.0, router))
    if name == 'capacity' and router == 'top_k':
      self.assertGreater(float(dropped), 0.0)  # the case exercises dropping, identically.


class MoELayerTest(parameterized.TestCase):
  """MoE(expert_axis='expert') under a mesh equals MoE() on one device: a training step's outputs,
  aux, updated router state, and gradients w.r.t. params and input."""

  @parameterized.named_parameters(
      ('ragged_d2e4', 'ragged', 'top_k', 'd2e4'),
      ('capacity_aux_free_f2e2m2', 'capacity', 'aux_free', 'f2e2m2'),
      ('ragged_expert_choice_e8', 'ragged', 'expert_choice', 'e8'),
      # Expert choice picks within each sequence (the capacity group), which stays on one device.
      ('capacity_expert_choice_e8', 'capacity', 'expert_choice', 'e8'),
      ('capacity_score_group_limited_e4', 'capacity', 'top_k', 'e4',
       dict(capacity_priority='score', num_expert_groups=4, top_groups=2)),
      ('ragged_d8', 'ragged', 'top_k', 'd8'),
      ('capacity_d2', 'capacity', 'top_k', 'd2'),
  )
  def test_matches_single_device(self, dispatch, router, mesh_name, fields=None):
    layer = dict(num_experts=E, top_k=K, d_ff=F, dispatch=dispatch, router=router,
                 capacity_factor=1.0, num_shared_experts=1, aux_free_bias_rate=0.1,
                 **(fields or {}))
    x = np.random.default_rng(1).standard_normal((B, S, D), np.float32)
    boxed, variables = random_variables(MoE(**layer), x, seed=2)

    def value_and_grads(module):
      def loss(params, x):
        (y, aux), state = module.apply({'params': params, **state_in}, x, train=True,
                                       mutable=['router_state'])
        total = jnp.sum(jnp.sin(y)) + aux['load_balance_loss'] + aux['router_z_loss']
        return total, (y, aux, state)
      return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

    params = variables['params']
    state_in = {k: v for k, v in variables.items() if k != 'params'}
    expected = value_and_grads(MoE(**layer))(params, x)
    mesh, rules = make_mesh(mesh_name)
    with sharding.mesh_context(mesh, rules):
      shardings = sharding.tree_shardings(boxed['params'], mesh, rules)
      params_sharded = jax.device_put(params, shardings)
      actual = value_and_grads(MoE(**layer, expert_axis='expert'))(params_sharded, x)
    self.assertEqual(params_sharded['experts']['wo'].sharding.spec[0], 'expert')
    assert_close(actual, expected)
    if router == 'aux_free':
      bias = expected[0][1][2]['router_state']['router']['bias']
      self.assertGreater(float(np.abs(bias).max()), 0.0)


def smoke_model():
  """moe_tiny:smoke, its abstract variables and a [B, S] batch of tokens."""
  config = load_config('moe_tiny', 'smoke')
  model = model_lib.build_model(config.model, precision.get_policy('fp32'))
  tokens = jnp.zeros((B, S), jnp.int32)
  return model, jax.eval_shape(model.init, jax.random.key(0), tokens), tokens


class ModelTest(parameterized.TestCase):

  def test_model_is_expert_parallel_under_an_expert_mesh(self):
    model, variables, tokens = smoke_model()
    apply = lambda v, t: model.apply(v, t)[0]
    self.assertNotIn('all_to_all', str(jax.make_jaxpr(apply)(variables, tokens)))
    mesh, rules = make_mesh('d2e4')
    with sharding.mesh_context(mesh, rules):
      self.assertEqual(expert_parallel.context_expert_axis(), 'expert')
      self.assertIn('all_to_all', str(jax.make_jaxpr(apply)(variables, tokens)))
    self.assertIsNone(expert_parallel.context_expert_axis())

  def test_model_dispatches_per_device_under_a_data_mesh(self):
    model, variables, tokens = smoke_model()
    apply = lambda v, t: model.apply(v, t)[0]
    self.assertNotIn('shard_map', str(jax.make_jaxpr(apply)(variables, tokens)))
    for name in ('d2', 'e2'):
      mesh, rules = make_mesh(name)
      with sharding.mesh_context(mesh, rules):
        jaxpr = str(jax.make_jaxpr(apply)(variables, tokens))
        self.assertIn('shard_map', jaxpr, name)
        self.assertEqual('all_to_all' in jaxpr, name == 'e2', name)
        with expert_parallel.global_view_dispatch():  # as an ensemble's members do
          # A new function: jax's trace cache keys on the mesh, not on this context.
          members = lambda v, t: model.apply(v, t)[0]
          self.assertNotIn('shard_map', str(jax.make_jaxpr(members)(variables, tokens)), name)
    with sharding.mesh_context(*make_mesh('one')):
      self.assertIsNone(expert_parallel.context_expert_axis())

  def test_router_stays_split_over_a_data_mesh(self):
    # XLA's TopK custom call would be gathered whole onto every device (routing.top_k_indices).
    model, variables, tokens = smoke_model()
    mesh, rules = make_mesh('d8')
    with sharding.mesh_context(mesh, rules):
      batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
      hlo = jax.jit(lambda v, t: model.apply(v, t)[0], in_shardings=(None, batch)).lower(
          variables, tokens).compile().as_text()
    self.assertIn(' sort(', hlo)  # the per-device dispatch, to show this is the partitioned step
    self.assertNotIn(' all-gather(', hlo)


class ValidateMeshTest(parameterized.TestCase):
  """expert_parallel.validate_mesh: the config-level checks, naming the config fields."""

  def _validate(self, config):
    expert_parallel.validate_mesh(config, sharding.make_mesh(config.mesh))

  def test_valid(self):
    config = load_config()
    config.mesh.update(data=2, expert=4)
    config.model.moe.update(dispatch='capacity', group_size=32)
    self._validate(config)

  def test_experts_not_divisible(self):
    config = load_config()
    config.model.moe.num_experts = 6
    config.mesh.update(data=2, expert=4)
    with self.assertRaisesRegex(ValueError, r"model\.moe\.num_experts=6 .*'expert' \(4\)"):
      self._validate(config)

  def test_tokens_must_split_over_expert(self):
    config = load_config()
    config.mesh.update(data=2, expert=4)
    config.mesh.rules = (('batch', 'data'),) + config.mesh.rules[1:]
    with self.assertRaisesRegex(ValueError, "lacks 'expert'"):
      self._validate(config)

  def test_capacity_group_straddles_devices(self):
    config = load_config()
    config.mesh.update(data=2, expert=4)
    config.model.moe.update(dispatch='capacity', group_size=48)
    with self.assertRaisesRegex(ValueError,
                                r'model\.moe\.group_size=48 .* 32 tokens per device of data\.batch'):
      self._validate(config)

  def test_eval_capacity_group_straddles_devices(self):
    config = load_config()
    config.mesh.update(data=2, expert=4)
    config.data.update(batch_size=16, eval_batch_size=8)  # 64 and 32 tokens per device
    config.model.moe.update(dispatch='capacity', group_size=64)
    with self.assertRaisesRegex(ValueError, r'group_size=64 .* 32 tokens per device of '
                                r'data\.eval_batch_size'):
      self._validate(config)


class ErrorTest(parameterized.TestCase):

  def _call(self, mesh_name=None, rules=RULES, num_experts=E, name='ragged', group_size=S):
    weights, x, index, gate = random_case(0)
    weights = jax.tree.map(lambda w: w[:num_experts], weights)
    fn = functools.partial(expert_parallel.dispatch, name, x, Routing(index, gate, {}),
                           weights, expert_axis='expert', num_experts=num_experts, top_k=K,
                           capacity_factor=1.0, group_size=group_size)
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

  @parameterized.named_parameters(('straddles', 16), ('zero', 0))
  def test_capacity_groups_stay_on_one_device(self, group_size):
    # e8 leaves B·S / 8 = 8 tokens per device.
    with self.assertRaisesRegex(ValueError, rf'group_size={group_size} .* 8 tokens per device'):
      self._call('e8', name='capacity', group_size=group_size)


class SlotTrafficTest(parameterized.TestCase):

  def test_matches_numpy_and_group_limits_bound_the_devices(self):
    # 64 tokens and 16 experts on 8 devices: 8 tokens and 2 experts (one expert group) each.
    x = np.random.default_rng(0).standard_normal((64, D), np.float32)
    kernel = np.random.default_rng(1).standard_normal((D, 16)).astype(np.float32)
    for top_groups in (8, 2):
      router = routing_lib.TopKRouter(16, 4, num_expert_groups=8, top_groups=top_groups)
      index = np.array(router.apply({'params': {'kernel': kernel}}, x).expert_index)
      index[3, 1] = -1  # an empty slot travels nowhere
      traffic = jax.jit(functools.partial(expert_parallel.slot_traffic, num_experts=16,
                                          num_devices=8))(index)
      token_device = np.arange(64)[:, None] // 8
      expert_device = np.where(index >= 0, index // 2, -1)
      remote = (index >= 0) & (expert_device != token_device)
      copies = [set(row[r]) for row, r in zip(expert_device, remote)]
      reached = [len(set(row[row >= 0])) for row in expert_device]
      self.assertEqual(int(traffic['remote_slots']), remote.sum())
      self.assertEqual(int(traffic['remote_copies']), sum(len(c) for c in copies))
      self.assertEqual(int(traffic['max_devices']), max(reached))
      self.assertLessEqual(int(traffic['max_devices']), top_groups)
      if top_groups == 8:  # unlimited, some token reaches more devices than the limit allows
        self.assertGreater(max(reached), 2)


if __name__ == '__main__':
  pytest.main([__file__])
