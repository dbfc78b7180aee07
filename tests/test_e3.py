"""E3, the efficient ensemble of experts: block-diagonal routing, tiling, training, decoding, cost.

Shapes: M copies, B batch, S seq, V vocab, E experts, K top_k, T tokens.
"""
import functools

from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import ensemble
from moejax import evaluation
from moejax import generate as generate_lib
from moejax import model as model_lib
from moejax import precision
from moejax import train
from moejax import workdir as workdir_lib
from test_sharding import load_config
from test_train import read_lines

B, S = 2, 8


def e3_config(size=2, e3_layers=1, **moe_fields):
  """moe_tiny smoke (D=32, 2 MoE layers) with 8 experts, top-2, dense dispatch (the quickest to
  trace) unless moe_fields say otherwise, as an E3 of `size` copies."""
  config = load_config('moe_tiny', 'smoke')
  config.model.moe.update({'num_experts': 8, 'top_k': 2, 'dispatch': 'dense', **moe_fields})
  config.ensemble.update(size=size, method='e3', e3_layers=e3_layers)
  return config


def build(config):
  return ensemble.build_model(config, precision.get_policy(config.precision.policy))


def tokens_for(seed=1, length=S):
  return jax.random.randint(jax.random.key(seed), (B, length), 0, 257)


@functools.lru_cache(maxsize=None)
def _init(size=2, e3_layers=1, **moe_fields):
  """(model, variables): N(0, 1/fan_in) parameters drawn in numpy, zero router state; compiling
  each variant's init would cost more than all its tests."""
  model = build(e3_config(size, e3_layers, **moe_fields))
  abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens_for()))
  rng = np.random.default_rng(0)
  def draw(leaf):
    fan_in = leaf.shape[-2] if leaf.ndim > 1 else 1
    return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), leaf.dtype)
  return model, {'params': jax.tree.map(draw, abstract['params']),
                 **({'router_state': jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                                                  abstract['router_state'])}
                    if 'router_state' in abstract else {})}


def captured_routings(model, variables, tokens, **apply_kwargs):
  """{layer: the Routing its router returned} of one forward pass."""
  _, state = model.apply(variables, tokens, mutable=['intermediates'],
                         capture_intermediates=lambda module, _: module.name == 'router',
                         **apply_kwargs)
  inter = state['intermediates']
  return {layer: inter[f'layer_{layer}']['ffn']['router']['__call__'][0] for layer in (0, 1)}


class RoutingTest(parameterized.TestCase):

  @parameterized.product(router=('top_k', 'noisy_top_k', 'aux_free'), size=(2, 4))
  def test_copies_never_route_outside_their_group(self, router, size):
    model, variables = _init(size, router=router)
    if router == 'aux_free':  # a bias that lifts the last group's experts over every other's
      router_state = jax.tree.map(lambda bias: bias.at[-8 // size:].set(100.0),
                                  variables['router_state'])
      variables = {**variables, 'router_state': router_state}
    routings = captured_routings(model, variables, tokens_for(), train=True,
                                 rngs={'router': jax.random.key(3)})
    e3_layer = routings[1]
    chex.assert_shape(e3_layer.expert_index, (size * B * S, 2))
    token_copy = np.arange(size * B * S) // (B * S)
    group = np.asarray(e3_layer.expert_index) // (8 // size)
    np.testing.assert_array_equal(group, np.broadcast_to(token_copy[:, None], group.shape))
    np.testing.assert_allclose(np.sum(e3_layer.combine_weight, axis=-1), 1.0, rtol=1e-6)
    # The layer before the tiling routes the one batch over all experts.
    chex.assert_shape(routings[0].expert_index, (B * S, 2))
    if size == 2 and router == 'top_k':
      self.assertGreater(len(np.unique(routings[0].expert_index // 4)), 1)

  def test_gates_are_the_softmax_over_the_group(self):
    model, variables = _init(2, normalize_top_k=False)
    _, state = model.apply(variables, tokens_for(), mutable=['intermediates'],
                           capture_intermediates=lambda module, _: module.name in ('router',
                                                                                    'ffn_norm'))
    layer = state['intermediates']['layer_1']
    routing = layer['ffn']['router']['__call__'][0]
    x = layer['ffn_norm']['__call__'][0].reshape(-1, 32)  # [M·B·S, D], copy-major
    kernel = variables['params']['layer_1']['ffn']['router']['kernel']
    for copy in range(2):
      rows, experts = slice(copy * B * S, (copy + 1) * B * S), slice(copy * 4, (copy + 1) * 4)
      probs = jax.nn.softmax(x[rows] @ kernel[:, experts], axis=-1)
      gates, index = jax.lax.top_k(probs, 2)
      np.testing.assert_array_equal(routing.expert_index[rows], index + copy * 4)
      np.testing.assert_allclose(routing.combine_weight[rows], gates, rtol=1e-5, atol=1e-6)

  def test_expert_choice_refuses_an_expert_mask(self):
    router = ensemble.routing.ExpertChoiceRouter(num_experts=4, top_k=1)
    x = jnp.ones((4, 8))
    mask = ensemble.routing.copy_expert_mask(4, 4, 2)
    with self.assertRaisesRegex(ValueError, 'expert_choice'):
      router.init(jax.random.key(0), x, expert_mask=mask)


class ModelTest(parameterized.TestCase):

  def test_one_copy_is_exactly_the_plain_model(self):
    config = e3_config(size=1, e3_layers=2)
    plain = build(config)
    self.assertIsInstance(plain, model_lib.TransformerLM)
    one_copy = ensemble.E3(plain.config, size=1, layers=2)
    params = nn.unbox(plain.init(jax.random.key(0), tokens_for()))['params']
    self.assertEqual(jax.tree.structure(params),
                     jax.tree.structure(nn.unbox(one_copy.init(jax.random.key(0),
                                                               tokens_for())['params'])))
    logits, aux = one_copy.apply({'params': params}, tokens_for())
    plain_logits, plain_aux = plain.apply({'params': params}, tokens_for())
    np.testing.assert_array_equal(logits[0], plain_logits)
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x[0], aux), plain_aux)

  def test_output_format_is_an_ensembles(self):
    model, variables = _init(2)
    deep = load_config('moe_tiny', 'smoke')
    deep.model.moe.update(num_experts=8, top_k=2)
    deep.ensemble.size = 2
    members = build(deep)
    e3_out = jax.eval_shape(model.apply, variables, tokens_for())
    deep_out = jax.eval_shape(members.apply, jax.eval_shape(members.init, jax.random.key(0),
                                                             tokens_for()), tokens_for())
    chex.assert_trees_all_equal_shapes_and_dtypes(e3_out, deep_out)
    chex.assert_shape(e3_out[0], (2, B, S, 257))
    self.assertTrue(ensemble.is_ensemble(model))
    self.assertFalse(ensemble.has_member_axis(model))
    _, state = model.apply(variables, tokens_for(), mutable=['intermediates'])
    chex.assert_shape(ensemble.final_hidden(model, state['intermediates']), (2, B, S, 32))

  @parameterized.parameters('ragged', 'capacity', 'dense')
  def test_with_every_layer_split_copy_m_is_the_model_of_group_m(self, dispatch):
    # e3_layers = both MoE layers: the tiling comes before layer 0's FFN, so copy m is a plain
    # model whose experts and router columns are group m's (the capacity dispatch then drops
    # exactly what an E/M-expert layer with the same capacity_factor drops).
    model, variables = _init(2, e3_layers=2, dispatch=dispatch)
    logits, aux = model.apply(variables, tokens_for())
    group_config = e3_config(size=1, dispatch=dispatch)
    group_config.model.moe.num_experts = 4
    group_model = build(group_config)

    def group_params(params, copy):
      def slice_experts(path, leaf):
        keys = [getattr(k, 'key', None) for k in path]
        if 'experts' in keys:
          return leaf[copy * 4:(copy + 1) * 4]
        if 'router' in keys:
          return leaf[:, copy * 4:(copy + 1) * 4]
        return leaf
      return jax.tree_util.tree_map_with_path(slice_experts, params)

    group_aux = []
    for copy in range(2):
      group_logits, a = group_model.apply({'params': group_params(variables['params'], copy)},
                                          tokens_for())
      np.testing.assert_allclose(logits[copy], group_logits, rtol=1e-5, atol=1e-5)
      group_aux.append(a)
    # The copies' joint routing reports the mean of the copies' own aux values.
    for key in ('load_balance_loss', 'router_z_loss', 'dropped_fraction', 'aux_loss'):
      np.testing.assert_allclose(aux[key][0], np.mean([a[key] for a in group_aux]), rtol=1e-5,
                                 atol=1e-7)
    if dispatch == 'capacity':
      self.assertGreater(float(aux['dropped_fraction'][0]), 0.0)

  def test_cached_decoding_equals_the_full_forward(self):
    model, variables = _init(2)
    tokens = tokens_for(length=7)
    full, _ = jax.jit(model.apply)(variables, tokens)
    cache = generate_lib.init_cache(model, B, 8)
    # Layer 0 and layer 1's attention run before the tiling (one batch), the rest on 2 copies.
    chex.assert_shape(cache['layer_1']['attn']['cached_key'], (B, 2, 8, 16))
    # One token per call, one compile (the greedy test below prefills a prompt at once).
    decode = jax.jit(functools.partial(model.apply, decode=True, mutable=['cache']))
    steps = []
    for chunk in [tokens[:, t:t + 1] for t in range(7)]:
      (logits, _), state = decode({**variables, 'cache': cache}, chunk)
      cache = state['cache']
      steps.append(logits)
    np.testing.assert_allclose(steps[-1][:, :, -1], full[:, :, -1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=2), full, rtol=1e-5, atol=1e-5)

  def test_later_layers_cache_every_copy(self):
    model, _ = _init(2, e3_layers=2)
    cache = generate_lib.init_cache(model, B, 8)
    chex.assert_shape(cache['layer_0']['attn']['cached_key'], (B, 2, 8, 16))
    chex.assert_shape(cache['layer_1']['attn']['cached_key'], (2 * B, 2, 8, 16))

  def test_greedy_decoding_follows_the_fused_distribution(self):
    model, variables = _init(2)
    prompt = tokens_for()[:, :3]
    out = generate_lib.generate(model, variables['params'], prompt, 5, jax.random.key(0),
                                temperature=0.0)
    logits, _ = jax.jit(model.apply)(variables, out[:, :-1])
    fused = ensemble.mean_prob(ensemble.log_probs(logits))
    np.testing.assert_array_equal(out[:, 3:], jnp.argmax(fused[:, 2:], axis=-1))


class CostTest(parameterized.TestCase):

  def test_flops_per_token_hand_count(self):
    # D=32, V=257, S=32, 8 experts of F=32, top-2; M=2 copies from layer 1's FFN on.
    config = e3_config(size=2, e3_layers=1)
    attention, router, experts = 4 * 32 * 32, 32 * 8, 2 * 3 * 32 * 32
    unembed = 32 * 257
    matmuls = (attention + experts + router) + (attention + 2 * (experts + router)) + 2 * unembed
    expected = 6 * matmuls + 12 * 2 * 32 * 32  # both attentions run once
    self.assertEqual(ensemble.flops_per_token(config), expected)
    deep = e3_config(size=2)
    deep.ensemble.update(method='deep', e3_layers=0)
    self.assertEqual(ensemble.flops_per_token(deep),
                     2 * model_lib.flops_per_token(deep.model, 32))

  def test_active_params_count_every_copys_experts(self):
    config = e3_config(size=2, e3_layers=1)
    model = build(config)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens_for()))['params']
    accounting = ensemble.state_accounting(config, params, {})
    routed = 3 * 8 * 32 * 32  # one layer's expert stack
    plain_active = accounting['num_params'] - 2 * routed * 6 // 8
    self.assertEqual(accounting['num_active_params'], plain_active + routed * 2 // 8)
    self.assertEqual(accounting['flops_per_token'], ensemble.flops_per_token(config))

  def test_objective_is_the_mean_of_the_copies_losses(self):
    config = e3_config()
    logits = jax.random.normal(jax.random.key(0), (2, B, S, 11))
    batch = jax.random.randint(jax.random.key(1), (B, S + 1), 0, 11)
    aux = {'aux_loss': jnp.full((2,), 0.25), 'load_balance_loss': jnp.ones((2,))}
    loss, metrics = ensemble.train_objective(config)((logits, aux), batch)
    ce = [float(jnp.mean(jax.nn.logsumexp(logits[m], -1) - jnp.take_along_axis(
        logits[m], batch[:, 1:, None], -1)[..., 0])) for m in range(2)]
    np.testing.assert_allclose(loss, np.mean(ce) + 0.25, rtol=1e-5)
    np.testing.assert_allclose(metrics['member_loss'], ce, rtol=1e-5)


class ConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('indivisible', dict(size=3), {}, r'model\.moe\.num_experts=8 .*ensemble\.size=3'),
      ('too_many_layers', dict(e3_layers=3), {}, r'ensemble\.e3_layers=3; expected 1\.\.2'),
      ('no_layers', dict(e3_layers=0), {}, r'ensemble\.e3_layers=0'),
      ('top_k', dict(size=8), {}, r'model\.moe\.top_k=2 exceeds the 1 experts'),
      ('expert_choice', {}, dict(router='expert_choice'), r"model\.moe\.router='expert_choice'"),
      ('group_limited', {}, dict(num_expert_groups=4, top_groups=2), r'model\.moe\.top_groups'),
  )
  def test_bad_config_names_the_field(self, ensemble_fields, moe_fields, message):
    config = e3_config(**moe_fields)
    config.ensemble.update(ensemble_fields)
    with self.assertRaisesRegex(ValueError, message):
      train.validate_config(config)

  def test_other_fields_that_cannot_work(self):
    dense = e3_config()
    dense.model.ffn = 'dense'
    with self.assertRaisesRegex(ValueError, r'model\.ffn'):
      train.validate_config(dense)
    deep = e3_config()
    deep.ensemble.method = 'deep'
    with self.assertRaisesRegex(ValueError, r"ensemble\.e3_layers=1 is read only by .*'e3'"):
      train.validate_config(deep)
    member_axis = e3_config()
    member_axis.mesh.member = 2
    with self.assertRaisesRegex(ValueError, r'mesh\.member=2'):
      train.validate_config(member_axis)


def test_smoke_training_run_learns_evaluates_and_fuses(tmp_path):
  config = load_config('ensemble_tiny', 'smoke')  # M=2, 4 experts of which each copy gets 2
  config.ensemble.update(method='e3', e3_layers=1, fusion='stacked', fit_steps=20)
  config.model.moe.dispatch = 'dense'
  config.train.update(num_steps=12, log_every=2, eval_every=12, checkpoint_every=12)
  workdir = str(tmp_path / 'e3')
  final = train.train_and_evaluate(config, workdir)
  lines = read_lines(workdir)
  assert lines[0]['flops_per_token'] == ensemble.flops_per_token(config)
  assert lines[0]['num_params'] > lines[0]['num_active_params']
  losses = [line['loss'] for line in lines if 'loss' in line]
  assert losses[-1] < losses[0] - 0.3, losses
  assert len(final['member_loss']) == 2

  report = evaluation.evaluate([workdir])
  assert len(report['members']) == 2 and report['fused']['fusion'] == 'stacked'
  assert report['disagreement'] > 0 and report['mutual_information'] > 0
  best_member = min(m['eval_loss'] for m in report['members'])
  assert report['fused']['eval_loss'] < best_member + 0.05

  decoder = evaluation.load_ensemble([workdir], fusion='mean_logprob')  # generate.py's
  assert isinstance(decoder.model, ensemble.E3) and decoder.fusion['fusion'] == 'mean_logprob'
  chex.assert_trees_all_equal_shapes(decoder.variables['params'],
                                     workdir_lib.restore_params(workdir)[1])
  with pytest.raises(ValueError, match='decodes alone'):
    evaluation.load_ensemble([workdir, workdir])
