"""Tests for moejax/moe.py: the MoE layer end to end, selective precision, validation, DenseFFN."""
import functools

from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
from jax.extend import core
import jax.numpy as jnp
import numpy as np

from moejax import dispatch
from moejax import experts
from moejax import moe
from moejax import precision
from moejax import routing
from test_dispatch import np_kept

B, S, D = 2, 8, 8
AUX_SHAPES = dict(load_balance_loss=(), router_z_loss=(), dropped_fraction=(), router_entropy=(),
                  aux_loss=())


def inputs(batch=B, seq=S, d_model=D, seed=0):
  return np.random.default_rng(seed).standard_normal((batch, seq, d_model)).astype(np.float32)


def random_variables(module, x, seed=1):
  """Variables shaped like module.init's, filled by numpy (no XLA compile for the init);
  router_state starts at zero, as init makes it."""
  abstract = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), x))
  rng = np.random.default_rng(seed)
  variables = {'params': jax.tree.map(
      lambda a: (0.4 * rng.standard_normal(a.shape)).astype(a.dtype), abstract['params'])}
  if 'router_state' in abstract:
    variables['router_state'] = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                                             abstract['router_state'])
  return variables


def dot_operand_dtypes(fn, *args):
  """[(primitive, lhs shape, lhs dtype, rhs shape, rhs dtype)] of every dot in fn's jaxpr."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if 'dot' in eqn.primitive.name:
        lhs, rhs = (v.aval for v in eqn.invars[:2])
        found.append((eqn.primitive.name, lhs.shape, lhs.dtype, rhs.shape, rhs.dtype))
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          if isinstance(sub, core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, core.Jaxpr):
            walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


class AgreementTest(parameterized.TestCase):

  @parameterized.named_parameters(
      dict(testcase_name='switch_k1', num_experts=4, top_k=1, normalize_top_k=False),
      dict(testcase_name='top2_shared_gelu', num_experts=4, top_k=2, num_shared_experts=1,
           activation='gelu'),
      # Expert choice takes C = ceil(1.0·T·k/E) = 8 of the T = 16 tokens per expert, so half its
      # slots are empty; with one capacity group of all T tokens (capacity 8) nothing is dropped.
      dict(testcase_name='expert_choice', num_experts=4, top_k=2, router='expert_choice',
           capacity_factor=1.0, group_size=B * S),
  )
  def test_dispatches_agree(self, **fields):
    # E=64 fine-grained agreement is checked at the dispatch level (tests/test_dispatch.py).
    fields = dict(dict(d_ff=6, capacity_factor=100.0), **fields)
    x = inputs()
    layers = {name: moe.MoE(dispatch=name, **fields) for name in ('dense', 'capacity', 'ragged')}
    variables = random_variables(layers['dense'], x)
    cotangent = inputs(seed=3)

    @jax.jit
    def outputs_and_grads(variables, x):
      results = {}
      for name, layer in layers.items():
        def loss(variables, x, layer=layer):
          y, aux = layer.apply(variables, x)
          return jnp.sum(y * cotangent) + aux['load_balance_loss'] + aux['router_z_loss'], (y, aux)
        grads, (y, aux) = jax.grad(loss, argnums=(0, 1), has_aux=True)(variables, x)
        results[name] = (y, aux, grads)
      return results

    results = outputs_and_grads(variables, x)
    y_dense, aux_dense, grads_dense = results['dense']
    chex.assert_shape(y_dense, (B, S, D))
    for name in ('capacity', 'ragged'):
      y, aux, grads = results[name]
      np.testing.assert_allclose(y, y_dense, rtol=1e-5, atol=1e-5, err_msg=name)
      chex.assert_trees_all_close(aux, aux_dense, rtol=1e-6, atol=1e-6)
      chex.assert_trees_all_close(grads, grads_dense, rtol=1e-4, atol=1e-5)
      self.assertEqual(float(aux['dropped_fraction']), 0.0)
    # Every param of the layer gets a gradient.
    for path, grad in jax.tree_util.tree_leaves_with_path(grads_dense[0]):
      self.assertGreater(float(jnp.max(jnp.abs(grad))), 0.0, msg=jax.tree_util.keystr(path))


class RouterDispatchTest(parameterized.TestCase):
  """Every router under every dispatch, with several sequences, group sizes and capacities."""

  @parameterized.product(
      [dict(group_size=0, capacity_factor=1.0), dict(group_size=4, capacity_factor=1.25),
       dict(group_size=24, capacity_factor=0.5)],
      router=routing.ROUTERS)
  def test_capacity_drops_only_what_it_must(self, router, group_size, capacity_factor):
    # B=3 sequences of S=8; group_size 0 = one group per sequence, 24 = one across the batch.
    fields = dict(num_experts=4, top_k=2, d_ff=6, router=router, group_size=group_size,
                  capacity_factor=capacity_factor)
    layers = {name: moe.MoE(dispatch=name, **fields) for name in dispatch.DISPATCHES}
    x = inputs(batch=3)
    variables = random_variables(layers['dense'], x)
    router_module = routing.make_router(
        router, num_experts=4, top_k=2, capacity_factor=capacity_factor,
        group_size=group_size or S)

    @jax.jit
    def run(variables):
      outputs = {name: layer.apply(variables, x) for name, layer in layers.items()}
      router_variables = {collection: tree['router'] for collection, tree in variables.items()}
      return outputs, router_module.apply(router_variables, x.reshape(-1, D))

    outputs, chosen = run(variables)
    y_dense, aux_dense = outputs['dense']
    np.testing.assert_allclose(outputs['ragged'][0], y_dense, rtol=1e-5, atol=1e-5)
    y_capacity, aux_capacity = outputs['capacity']
    index = np.asarray(chosen.expert_index)
    if router == 'expert_choice':
      # The router chose per capacity group, so the capacity dispatch keeps every chosen slot.
      self.assertEqual(float(aux_capacity['dropped_fraction']), 0.0)
      np.testing.assert_allclose(y_capacity, y_dense, rtol=1e-5, atol=1e-5)
      return
    # Token choice: the capacity output is the dense one without the slots the reference drops.
    capacity = dispatch.group_capacity(group_size or S, 4, 2, capacity_factor)
    kept = np_kept(index, group_size or S, capacity)
    self.assertAlmostEqual(float(aux_capacity['dropped_fraction']), 1 - kept.mean(), places=6)
    self.assertEqual(float(aux_dense['dropped_fraction']), 0.0)
    p = nn.unbox(variables['params']['experts'])
    kept_routing = chosen.replace(combine_weight=jnp.where(kept, chosen.combine_weight, 0.0))
    y_kept, _ = dispatch.dense_dispatch(
        x.reshape(-1, D), kept_routing, functools.partial(experts.expert_ffn, p['wi_0'],
                                                          p['wi_1'], p['wo']), num_experts=4)
    np.testing.assert_allclose(y_capacity.reshape(-1, D), y_kept, rtol=1e-5, atol=1e-5)

  def test_expert_choice_agrees_across_sequences(self):
    # The case: 4 sequences, one capacity group each; before, expert choice ranked all
    # 64 tokens at once and the capacity dispatch dropped 6-12 % of its slots.
    layers = {name: moe.MoE(num_experts=8, top_k=2, d_ff=8, router='expert_choice',
                            dispatch=name) for name in dispatch.DISPATCHES}
    x = inputs(batch=4, seq=16, d_model=16)
    variables = random_variables(layers['dense'], x)
    outputs = jax.jit(lambda v: {n: l.apply(v, x) for n, l in layers.items()})(variables)
    for name in ('capacity', 'ragged'):
      np.testing.assert_allclose(outputs[name][0], outputs['dense'][0], rtol=1e-5, atol=1e-5,
                                 err_msg=name)
      self.assertEqual(float(outputs[name][1]['dropped_fraction']), 0.0)


class CausalityTest(parameterized.TestCase):
  """Whether changing a later token can change an earlier token's output (capacity priority)."""

  def _earliest_changed(self, capacity_priority, seed):
    """Position of the first output that moves when tokens 12..15 of 16 change (16: none)."""
    layer = moe.MoE(num_experts=4, top_k=1, d_ff=6, dispatch='capacity', capacity_factor=1.0,
                    capacity_priority=capacity_priority)
    x = inputs(batch=1, seq=16, seed=seed)
    changed = x.copy()
    changed[0, 12:] = inputs(batch=1, seq=4, seed=seed + 100)[0]
    variables = random_variables(layer, x)
    (y, aux), (y_changed, _) = jax.jit(lambda v: (layer.apply(v, x), layer.apply(v, changed)))(
        variables)
    self.assertGreater(float(aux['dropped_fraction']), 0.0)
    moved = np.any(np.abs(np.asarray(y - y_changed))[0] > 1e-6, axis=-1)
    return int(np.argmax(moved)) if moved.any() else 16

  def test_position_priority_is_causal(self):
    earliest = [self._earliest_changed('position', seed) for seed in range(3)]
    self.assertGreaterEqual(min(earliest), 12)
    self.assertLess(min(earliest), 16)  # the change reached some output

  def test_score_priority_is_not(self):
    self.assertLess(min(self._earliest_changed('score', seed) for seed in range(3)), 12)


class LayerTest(parameterized.TestCase):

  def test_params_and_aux(self):
    layer = moe.MoE(num_experts=4, top_k=2, d_ff=6, num_shared_experts=2)
    x = inputs()
    boxed = jax.eval_shape(layer.init, jax.random.key(0), x)['params']
    expected = {
        ('router', 'kernel'): ((D, 4), ('embed', None)),
        ('experts', 'wi_0'): ((4, D, 6), ('expert', 'embed', 'mlp')),
        ('experts', 'wi_1'): ((4, D, 6), ('expert', 'embed', 'mlp')),
        ('experts', 'wo'): ((4, 6, D), ('expert', 'mlp', 'embed')),
        ('shared_experts', 'wi_0'): ((D, 12), ('embed', 'mlp')),
        ('shared_experts', 'wi_1'): ((D, 12), ('embed', 'mlp')),
        ('shared_experts', 'wo'): ((12, D), ('mlp', 'embed')),
    }
    got = {(m, n): (p.value.shape, p.names) for m, sub in boxed.items() for n, p in sub.items()}
    self.assertEqual(got, expected)

    y, aux = jax.jit(layer.apply)(random_variables(layer, x), x)
    chex.assert_shape(y, (B, S, D))
    chex.assert_shape([aux[k] for k in AUX_SHAPES], list(AUX_SHAPES.values()))
    chex.assert_shape(aux['expert_fraction'], (4,))
    chex.assert_type(list(aux.values()), jnp.float32)
    self.assertAlmostEqual(float(jnp.sum(aux['expert_fraction'])), 1.0, places=6)
    self.assertEqual(set(aux), set(AUX_SHAPES) | {'expert_fraction'})

  def test_traces_once(self):
    layer = moe.MoE(num_experts=4, top_k=2, d_ff=6)
    variables = random_variables(layer, inputs())
    apply = jax.jit(chex.assert_max_traces(lambda v, x: layer.apply(v, x), n=1))
    first, _ = apply(variables, inputs(seed=0))
    second, _ = apply(variables, inputs(seed=1))
    self.assertFalse(np.allclose(first, second))

  def test_capacity_drops_are_reported(self):
    layer = moe.MoE(num_experts=4, top_k=2, d_ff=6, dispatch='capacity', capacity_factor=0.5,
                    group_size=4)
    x = inputs()
    _, aux = jax.jit(layer.apply)(random_variables(layer, x), x)
    # C = ceil(0.5 * 2 * 4 / 4) = 1 slot per expert and group of 4 tokens: at least half of the
    # 8 slots of each group are dropped.
    self.assertGreaterEqual(float(aux['dropped_fraction']), 0.5)
    self.assertLess(float(aux['dropped_fraction']), 1.0)

  @parameterized.parameters(dict(router='noisy_top_k'), dict(router='top_k', jitter_noise=0.3))
  def test_noise_only_in_training(self, **fields):
    layer = moe.MoE(num_experts=4, top_k=2, d_ff=6, **fields)
    x = inputs()
    variables = random_variables(layer, x)

    @functools.partial(jax.jit, static_argnums=0)
    def run(train, seed):
      return layer.apply(variables, x, train=train, rngs={'router': jax.random.key(seed)})[0]

    np.testing.assert_array_equal(run(False, 0), run(False, 1))
    self.assertGreater(float(jnp.max(jnp.abs(run(True, 0) - run(True, 1)))), 1e-4)

  def test_aux_free_state_updates_only_when_mutable_and_training(self):
    layer = moe.MoE(num_experts=4, top_k=2, d_ff=6, router='aux_free', aux_free_bias_rate=0.1)
    x = inputs()
    variables = random_variables(layer, x)

    @functools.partial(jax.jit, static_argnums=0)
    def step(train, variables):
      return layer.apply(variables, x, train=train, mutable=['router_state'])

    (_, aux), state = step(True, variables)
    load = np.asarray(aux['expert_fraction'])
    np.testing.assert_allclose(state['router_state']['router']['bias'],
                               0.1 * np.sign(0.25 - load))
    _, state = step(False, variables)
    np.testing.assert_array_equal(state['router_state']['router']['bias'], np.zeros(4))


class PrecisionTest(parameterized.TestCase):

  @parameterized.parameters('ragged', 'capacity', 'dense')
  def test_bf16_router_fp32_experts_bf16(self, dispatch):
    policy = precision.get_policy('bf16')
    layer = moe.MoE(num_experts=4, top_k=2, d_ff=6, dispatch=dispatch, num_shared_experts=1,
                    dtype=policy.compute_dtype, param_dtype=policy.param_dtype)
    x = inputs()
    variables = jax.eval_shape(layer.init, jax.random.key(0), x)
    dots = dot_operand_dtypes(lambda v, x: layer.apply(v, x), variables, x)
    router_dots = [d for d in dots if d[3] == (D, 4)]
    # Stacked expert weights: [E, ...], or one slice per row block with gmm_impl 'blocked'.
    expert_dots = [d for d in dots if len(d[3]) == 3 and d[3][1:] in ((D, 6), (6, D))]
    shared_dots = [d for d in dots if d[3] in ((D, 6), (6, D))]
    self.assertLen(router_dots, 1)
    self.assertLen(expert_dots, 3)
    self.assertLen(shared_dots, 3)
    self.assertEqual(router_dots[0][2:5:2], (jnp.float32, jnp.float32))
    for dot in expert_dots + shared_dots:
      self.assertEqual(dot[2:5:2], (jnp.bfloat16, jnp.bfloat16), msg=str(dot))

    y, aux = jax.eval_shape(layer.apply, variables, x)
    self.assertEqual(y.dtype, jnp.bfloat16)
    chex.assert_type(list(aux.values()), jnp.float32)

  def test_pure_bf16_params(self):
    policy = precision.get_policy('pure_bf16')
    layer = moe.MoE(num_experts=4, top_k=2, d_ff=6, router='aux_free', num_shared_experts=1,
                    dtype=policy.compute_dtype, param_dtype=policy.param_dtype)
    x = inputs()
    variables = nn.unbox(jax.eval_shape(layer.init, jax.random.key(0), x))
    chex.assert_type(jax.tree.leaves(variables['params']), jnp.bfloat16)
    self.assertLen(jax.tree.leaves(variables['params']), 7)
    # The aux-free bias accumulates 1e-3 steps, which bf16 would round away: kept in float32.
    self.assertEqual(variables['router_state']['router']['bias'].dtype, jnp.float32)
    y, aux = jax.jit(layer.apply)(random_variables(layer, x), x)
    self.assertEqual(y.dtype, jnp.bfloat16)
    chex.assert_type(list(aux.values()), jnp.float32)
    self.assertTrue(bool(jnp.all(jnp.isfinite(y))))


class ValidationTest(parameterized.TestCase):

  @parameterized.named_parameters(
      dict(testcase_name='top_k_above_e', fields=dict(top_k=5),
           match=r'top_k=5.*1\.\.num_experts=4'),
      dict(testcase_name='top_k_zero', fields=dict(top_k=0), match=r'top_k=0'),
      dict(testcase_name='capacity_factor', fields=dict(capacity_factor=0.0),
           match=r'capacity_factor=0.0; must be > 0'),
      dict(testcase_name='dispatch', fields=dict(dispatch='megablocks'),
           match=r"dispatch='megablocks'.*'dense', 'capacity', 'ragged'"),
      dict(testcase_name='router', fields=dict(router='hash'),
           match=r"router='hash'.*'top_k', 'noisy_top_k', 'expert_choice', 'aux_free'"),
      dict(testcase_name='activation', fields=dict(activation='relu'),
           match=r"activation='relu'.*'gelu', 'swiglu'"),
      dict(testcase_name='group_size', fields=dict(group_size=-1), match=r'group_size=-1'),
      dict(testcase_name='group_size_divides', fields=dict(dispatch='capacity', group_size=5),
           match=r'group_size=5.*T=16'),
  )
  def test_bad_config(self, fields, match):
    layer = moe.MoE(**dict(dict(num_experts=4, top_k=2, d_ff=6), **fields))
    with self.assertRaisesRegex(ValueError, match):
      jax.eval_shape(layer.init, jax.random.key(0), inputs())

  def test_params_for_another_d_model(self):
    layer = moe.MoE(num_experts=4, top_k=2, d_ff=6)
    variables = jax.eval_shape(layer.init, jax.random.key(0), inputs())
    with self.assertRaisesRegex(ValueError, r'router/kernel has shape \(8, 4\).*d_model=16'):
      jax.eval_shape(layer.apply, variables, inputs(d_model=16))

  @parameterized.parameters(('shared_experts', 'wi_1'), ('experts', 'wo'))
  def test_mis_shaped_param(self, module, name):
    layer = moe.MoE(num_experts=4, top_k=2, d_ff=6, num_shared_experts=1)
    variables = nn.unbox(jax.eval_shape(layer.init, jax.random.key(0), inputs()))
    param = variables['params'][module][name]
    variables['params'][module][name] = jax.ShapeDtypeStruct(param.shape[:-1] + (7,), param.dtype)
    with self.assertRaisesRegex(ValueError, f'param {module}/{name} has shape'):
      jax.eval_shape(layer.apply, variables, inputs())

  def test_input_rank(self):
    layer = moe.MoE(num_experts=4, top_k=2, d_ff=6)
    with self.assertRaisesRegex(AssertionError, 'rank'):
      jax.eval_shape(layer.init, jax.random.key(0), jnp.zeros((B * S, D)))


class DenseFFNTest(parameterized.TestCase):

  def test_aux_and_shapes(self):
    layer = moe.DenseFFN(16, dtype=jnp.bfloat16)
    x = inputs()
    y, aux = jax.jit(layer.apply)(random_variables(layer, x), x)
    chex.assert_shape(y, (B, S, D))
    self.assertEqual(y.dtype, jnp.bfloat16)
    self.assertEqual(set(aux), set(AUX_SHAPES) | {'expert_fraction'})
    chex.assert_type(list(aux.values()), jnp.float32)
    np.testing.assert_array_equal(aux['expert_fraction'], [1.0])
    for key in AUX_SHAPES:
      self.assertEqual(float(aux[key]), 0.0)
