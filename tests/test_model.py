"""Tests for moejax.model: shapes, causality, aux losses, precision, FLOPs, params, validation."""
import functools
import re

from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import config_files
from moejax import model as model_lib
from moejax import moe as moe_lib
from moejax import precision

B, S = 2, 8

moe_tiny = config_files.load_module('moe_tiny')


def tiny_config(**overrides):
  """D=32, 2 layers, 4 experts of width 16, vocab 64."""
  config = moe_tiny.get_config('smoke').model
  config.update(vocab_size=64, d_model=32, num_layers=2, num_heads=2, d_ff=64, max_seq_len=16)
  config.moe.update(dispatch='ragged', num_experts=4, top_k=2, d_ff=16, load_balance_weight=0.3,
                    z_loss_weight=0.7)
  config.update(overrides)
  return config


def tokens_for(seed=0, batch=B, length=S, vocab=64):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab, jnp.int32)


@functools.lru_cache(maxsize=None)
def _fp32_variables(ffn):
  model = model_lib.build_model(tiny_config(ffn=ffn), precision.get_policy('fp32'))
  return jax.jit(model.init)(jax.random.key(0), tokens_for())


@functools.lru_cache(maxsize=None)
def _init(ffn, tie_embeddings, policy_name):
  """(model, variables, jitted apply), cached: compiling an init costs seconds on CPU.

  One fp32 init per ffn kind serves every variant: tying only drops the output kernel, and the
  'bf16' policy keeps float32 params.
  """
  model = model_lib.build_model(tiny_config(ffn=ffn, tie_embeddings=tie_embeddings),
                                precision.get_policy(policy_name))
  variables = _fp32_variables(ffn)
  if tie_embeddings:
    variables = {**variables,
                 'params': {k: v for k, v in variables['params'].items() if k != 'logits'}}
  return model, variables, jax.jit(model.apply)


class ModelTest(parameterized.TestCase):

  @parameterized.parameters(('dense', False), ('moe', False), ('moe', True))
  def test_shapes_dtypes_and_aux(self, ffn, tie_embeddings):
    _, variables, forward = _init(ffn, tie_embeddings, 'fp32')
    logits, aux = forward(variables, tokens_for())
    chex.assert_shape(logits, (B, S, 64))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)
    self.assertEqual(set(aux), {'aux_loss', 'load_balance_loss', 'router_z_loss',
                                'dropped_fraction', 'router_entropy', 'expert_fraction'})
    chex.assert_shape(aux['expert_fraction'], (2, 4) if ffn == 'moe' else (0, 1))
    params = variables['params']
    self.assertEqual('logits' in params, not tie_embeddings)
    self.assertEqual('experts' in params['layer_0']['ffn'], ffn == 'moe')

  def test_every_param_has_logical_axis_names(self):
    _, variables, _ = _init('moe', False, 'fp32')
    leaves = jax.tree.leaves(variables['params'],
                             is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    self.assertNotEmpty(leaves)
    for leaf in leaves:
      self.assertIsInstance(leaf, nn.LogicallyPartitioned)
      self.assertLen(leaf.names, leaf.value.ndim)
    params = variables['params']
    self.assertEqual(params['embedding'].names, ('vocab', 'embed'))
    self.assertEqual(params['layer_0']['attn']['query'].names, ('embed', 'heads', 'kv'))
    self.assertEqual(params['layer_0']['attn']['out'].names, ('heads', 'kv', 'embed'))
    self.assertEqual(params['logits'].names, ('embed', 'vocab'))

  @parameterized.parameters('dense', 'moe')
  def test_causal(self, ffn):
    _, variables, forward = _init(ffn, False, 'fp32')
    tokens = tokens_for()
    t = 5
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % 64)
    logits, _ = forward(variables, tokens)
    logits_changed, _ = forward(variables, changed)
    np.testing.assert_allclose(logits[:, :t], logits_changed[:, :t], rtol=0, atol=1e-6)
    self.assertGreater(float(jnp.max(jnp.abs(logits[:, t:] - logits_changed[:, t:]))), 1e-3)

  def test_aux_loss_is_weighted_sum_over_moe_layers(self):
    model, variables, _ = _init('moe', False, 'fp32')
    apply = jax.jit(functools.partial(model.apply, capture_intermediates=True,
                                      mutable=['intermediates']))
    (_, aux), state = apply(variables, tokens_for())
    layer_aux = [state['intermediates'][f'layer_{i}']['ffn']['__call__'][0][1] for i in (0, 1)]
    expected = sum(0.3 * a['load_balance_loss'] + 0.7 * a['router_z_loss'] for a in layer_aux)
    np.testing.assert_allclose(aux['aux_loss'], expected, rtol=1e-6)
    self.assertGreater(float(aux['aux_loss']), 0.0)
    for key in model_lib.AUX_MEAN_KEYS:
      np.testing.assert_allclose(aux[key], (layer_aux[0][key] + layer_aux[1][key]) / 2, rtol=1e-6)
    np.testing.assert_allclose(aux['expert_fraction'],
                               jnp.stack([a['expert_fraction'] for a in layer_aux]), rtol=1e-6)

  def test_dense_model_has_zero_aux_loss(self):
    _, variables, forward = _init('dense', False, 'fp32')
    _, aux = forward(variables, tokens_for())
    self.assertEqual(float(aux['aux_loss']), 0.0)

  def test_moe_layer_placement(self):
    config = tiny_config(num_layers=4, first_dense_layers=1, moe_every=2)
    self.assertEqual([model_lib.is_moe_layer(config, i) for i in range(4)],
                     [False, True, False, True])
    model = model_lib.build_model(config, precision.get_policy('fp32'))
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens_for())
    params = variables['params']
    self.assertEqual(['experts' in params[f'layer_{i}']['ffn'] for i in range(4)],
                     [False, True, False, True])
    _, aux = jax.eval_shape(model.apply, variables, tokens_for())
    self.assertEqual(aux['expert_fraction'].shape, (2, 4))

  def test_remat_gives_the_same_loss_and_gradients(self):
    _, variables, _ = _init('moe', False, 'fp32')
    tokens = tokens_for()

    def loss_and_grads(remat):
      model = model_lib.build_model(tiny_config(remat=remat), precision.get_policy('fp32'))

      def loss(params):
        logits, aux = model.apply({'params': params}, tokens, train=True)
        return jnp.mean(jax.nn.logsumexp(logits, -1)) + aux['aux_loss']
      params = nn.unbox(variables['params'])
      jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
      # The blocks really are rematerialised (the primitive's name differs between jax versions).
      self.assertEqual(bool(re.search(r'\b(remat2?|checkpoint)\[', jaxpr)), remat)
      return jax.jit(jax.value_and_grad(loss))(params)

    chex.assert_trees_all_close(loss_and_grads(True), loss_and_grads(False), rtol=1e-6, atol=1e-6)

  def test_bf16_policy(self):
    model, variables, _ = _init('moe', False, 'bf16')
    shapes = jax.eval_shape(model.init, jax.random.key(0), tokens_for())
    for leaf in jax.tree.leaves(nn.unbox(shapes['params'])):
      self.assertEqual(leaf.dtype, jnp.float32)
    apply = jax.jit(functools.partial(model.apply, capture_intermediates=True,
                                      mutable=['intermediates']))
    (logits, aux), state = apply(variables, tokens_for())
    inter = state['intermediates']
    chex.assert_type(inter['layer_0']['__call__'][0][0], jnp.bfloat16)
    chex.assert_type(inter['layer_1']['attn']['__call__'][0], jnp.bfloat16)
    chex.assert_type(inter['final_norm']['__call__'][0], jnp.bfloat16)
    chex.assert_type(logits, jnp.float32)
    chex.assert_type(aux['aux_loss'], jnp.float32)
    chex.assert_tree_all_finite(logits)

  def test_pure_bf16_policy_stores_bf16_params(self):
    model = model_lib.build_model(tiny_config(), precision.get_policy('pure_bf16'))
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens_for())
    for leaf in jax.tree.leaves(nn.unbox(variables['params'])):
      self.assertEqual(leaf.dtype, jnp.bfloat16)

  def test_flops_per_token_hand_count(self):
    # 3 layers: layer 0 dense, 1 MoE, 2 dense (first_dense_layers=1, moe_every=2); D=32, V=64.
    config = tiny_config(num_layers=3, first_dense_layers=1, moe_every=2)
    config.moe.num_shared_experts = 1
    attention_proj = 4 * 32 * 32
    dense_ffn = 3 * 32 * 64
    moe_ffn = (2 + 1) * 3 * 32 * 16 + 32 * 4  # top_k + shared experts, router
    matmul_params = 3 * attention_proj + 2 * dense_ffn + moe_ffn + 32 * 64
    expected = 6 * matmul_params + 12 * 3 * 32 * 16
    self.assertEqual(model_lib.flops_per_token(config, seq_len=16), expected)

  def test_flops_per_token_dense(self):
    config = tiny_config(ffn='dense', num_layers=1)
    expected = 6 * (4 * 32 * 32 + 3 * 32 * 64 + 32 * 64) + 12 * 1 * 32 * 8
    self.assertEqual(model_lib.flops_per_token(config, seq_len=8), expected)

  def test_param_counts(self):
    config = tiny_config()
    _, variables, _ = _init('moe', False, 'fp32')
    counts = model_lib.param_counts(variables['params'], config)
    total = sum(x.size for x in jax.tree.leaves(nn.unbox(variables['params'])))
    routed_per_layer = 3 * 4 * 32 * 16  # wi_0, wi_1, wo of 4 experts
    self.assertEqual(counts['total'], total)
    self.assertEqual(counts['active'], total - 2 * routed_per_layer // 2)  # top 2 of 4 active

  @parameterized.named_parameters(
      ('heads', dict(num_heads=3), 'model.num_heads'),
      ('zero_heads', dict(num_heads=0), r'model\.num_heads=0'),
      ('zero_layers', dict(num_layers=0), r'model\.num_layers=0'),
      ('ffn', dict(ffn='sparse'), 'model.ffn'),
      ('moe_every', dict(moe_every=0), 'model.moe_every'),
      ('first_dense', dict(first_dense_layers=-1), 'model.first_dense_layers'),
      ('odd_head_dim', dict(num_heads=32), 'rotary'),
      ('attention_impl', dict(attention_impl='flash'), 'model.attention_impl'),
  )
  def test_bad_config_raises(self, overrides, field):
    with self.assertRaisesRegex(ValueError, field):
      model_lib.build_model(tiny_config(**overrides), precision.get_policy('fp32'))

  def test_cudnn_attention_off_gpu_raises(self):
    if jax.default_backend() == 'gpu':
      self.skipTest('checks the error off NVIDIA GPUs')
    model = model_lib.build_model(tiny_config(attention_impl='cudnn'), precision.get_policy('fp32'))
    with self.assertRaisesRegex(ValueError, "attention_impl='cudnn' needs an NVIDIA GPU"):
      model.init(jax.random.key(0), tokens_for())

  @pytest.mark.gpu
  @pytest.mark.skipif(jax.default_backend() != 'gpu',
                      reason='GPU-only test: cuDNN attention needs an NVIDIA GPU')
  def test_gpu_cudnn_attention_matches_xla(self):
    # head_dim 64, bf16: the shapes cuDNN's flash attention serves.
    config = dict(d_model=256, num_heads=4, max_seq_len=128)
    tokens = tokens_for(batch=2, length=128)
    results = []
    for impl in ('xla', 'cudnn'):
      model = model_lib.build_model(tiny_config(attention_impl=impl, **config),
                                    precision.get_policy('bf16'))
      variables = model.init(jax.random.key(0), tokens)
      loss = lambda v: jnp.mean(model.apply(v, tokens)[0] ** 2)
      results.append(jax.jit(jax.value_and_grad(loss))(variables))
    (loss_xla, grads_xla), (loss_cudnn, grads_cudnn) = results
    np.testing.assert_allclose(loss_cudnn, loss_xla, rtol=2e-2)
    # All gradients as one vector: single small leaves (the router's) are dominated by bf16
    # rounding, which differs between the two kernels.
    flat = lambda tree: np.concatenate([np.ravel(np.asarray(x, np.float32))
                                        for x in jax.tree.leaves(tree)])
    got, want = flat(grads_cudnn), flat(grads_xla)
    self.assertLess(np.linalg.norm(got - want), 3e-2 * np.linalg.norm(want))

  def test_input_longer_than_max_seq_len_raises(self):
    model, variables, _ = _init('dense', False, 'fp32')
    with self.assertRaisesRegex(ValueError, 'model.max_seq_len=16'):
      model.apply(variables, tokens_for(length=17))


def test_router_dtype_is_validated_naming_the_field():
  config = tiny_config()
  config.moe.router_dtype = 'float16'
  with pytest.raises(ValueError, match=r"model.moe.router_dtype='float16'; expected one of"):
    model_lib.validate_config(config)


def test_the_moe_section_maps_onto_moe_fields_and_an_unknown_key_fails_naming_it():
  config = tiny_config()
  assert set(config.moe) == set(moe_lib.config_fields())
  config.moe.num_experts = 0
  with pytest.raises(ValueError, match=r'model\.moe\.num_experts=0; must be >= 1'):
    model_lib.validate_config(config)
  config = tiny_config()
  with config.moe.unlocked():
    config.moe.capacity_factr = 2.0
  with pytest.raises(ValueError, match=r'model\.moe\.capacity_factr is not a field of'):
    model_lib.build_model(config, precision.get_policy('fp32'))


def test_each_moe_layer_weighs_its_own_aux_losses():
  layer = moe_lib.MoE(num_experts=4, top_k=2, d_ff=8, load_balance_weight=0.3, z_loss_weight=0.7)
  x = jax.random.normal(jax.random.key(0), (2, 4, 16))
  _, aux = layer.apply(layer.init(jax.random.key(1), x), x)
  np.testing.assert_allclose(aux['aux_loss'],
                             0.3 * aux['load_balance_loss'] + 0.7 * aux['router_z_loss'],
                             rtol=1e-6)
