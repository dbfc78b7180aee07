"""Tests for moejax/int8.py: int8 expert weights for inference, fake quantisation for QAT."""

from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import config_files
from moejax import experts as experts_lib
from moejax import int8
from moejax import memory
from moejax import model as model_lib
from moejax import precision
from moejax import train

E, D, F, N = 4, 16, 24, 40


def smoke_config():
  return config_files.get_config('moe_tiny:smoke')


def float_experts_params(key=0):
  x = jnp.zeros((E, 2, D))
  return nn.unbox(experts_lib.Experts(E, F).init(jax.random.key(key), x))['params']


class Int8Test(parameterized.TestCase):

  def test_quantize_weight_is_per_expert_and_output_channel(self):
    w = jax.random.normal(jax.random.key(0), (E, D, F)) * jnp.arange(1, F + 1)  # channel scales
    q, scale = int8.quantize_weight(w)
    self.assertEqual((q.dtype, scale.dtype, scale.shape), (jnp.int8, jnp.float32, (E, 1, F)))
    np.testing.assert_allclose(scale, np.max(np.abs(w), axis=1, keepdims=True) / 127, rtol=1e-6)
    self.assertEqual(int(jnp.max(jnp.abs(q.astype(jnp.int32)))), 127)
    error = np.abs(np.asarray(int8.dequantize(q, scale, jnp.float32)) - np.asarray(w))
    self.assertTrue(np.all(error <= np.asarray(scale) / 2 * (1 + 1e-5)))

  @parameterized.parameters(None, 'ragged')
  def test_int8_experts_match_float_within_two_percent(self, path):
    params = float_experts_params()
    quantized = int8.quantize_expert_params({'experts': params})['experts']
    float_layer = experts_lib.Experts(E, F)
    int8_layer = experts_lib.Experts(E, F, quantization='int8')
    if path is None:
      args = (jax.random.normal(jax.random.key(1), (E, 5, D)),)
    else:
      args = (jax.random.normal(jax.random.key(1), (N, D)), jnp.array([10, 0, 20, 10], jnp.int32))
    want = float_layer.apply({'params': params}, *args)
    got = int8_layer.apply({'params': quantized}, *args)
    # Stated tolerance: 8-bit weights (step 1/127 of each channel's max) give ~1 % relative error.
    rel = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    self.assertBetween(rel, 1e-4, 0.02)

  def test_expert_weight_bytes_are_a_quarter_plus_scales(self):
    params = {'layer': {'experts': float_experts_params()}}
    quantized = int8.quantize_expert_params(params)
    self.assertEqual(memory.expert_weight_bytes(params), 4 * 3 * E * D * F)
    scale_bytes = 4 * E * (F + F + D)  # one float32 per expert and output channel
    self.assertEqual(memory.expert_weight_bytes(quantized), 3 * E * D * F + scale_bytes)

  def test_fake_quantization_rounds_forward_and_passes_gradients_straight_through(self):
    w = jax.random.normal(jax.random.key(2), (E, D, F))
    q, scale = int8.quantize_weight(w)
    np.testing.assert_array_equal(int8.fake_quantize_weight(w), int8.dequantize(q, scale, jnp.float32))
    probe = jax.random.normal(jax.random.key(3), w.shape)
    grad = jax.grad(lambda v: jnp.sum(int8.fake_quantize_weight(v) * probe))(w)
    np.testing.assert_array_equal(grad, probe)
    x = jnp.concatenate([jax.random.normal(jax.random.key(4), (3, D)), jnp.zeros((2, D))])
    rows = int8.fake_quantize_rows(x)
    np.testing.assert_array_equal(rows[3:], 0.0)  # padding rows stay zero
    steps = np.asarray(rows[:3] / (jnp.max(jnp.abs(x[:3]), axis=-1, keepdims=True) / 127))
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)  # on each row's int8 grid

  def test_qat_model_trains_with_finite_gradients_near_the_float_ones(self):
    config = smoke_config().model
    tokens = jax.random.randint(jax.random.key(5), (2, 16), 0, config.vocab_size)
    policy = precision.get_policy('fp32')
    float_model = model_lib.build_model(config, policy)
    qat_model = model_lib.build_model(config, policy, 'int8_qat')
    params = nn.unbox(float_model.init(jax.random.key(6), tokens))['params']

    def grads(model):
      def loss(p):
        logits, _ = model.apply({'params': p}, tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1))
      return jax.grad(loss)(params)

    want, got = grads(float_model), grads(qat_model)
    self.assertTrue(bool(precision.all_finite(got)))
    want_flat, got_flat = (jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)])
                           for g in (want, got))
    rel = float(jnp.linalg.norm(got_flat - want_flat) / jnp.linalg.norm(want_flat))
    self.assertBetween(rel, 1e-5, 0.1)

  def test_unknown_quantization_names_the_allowed(self):
    with self.assertRaisesRegex(ValueError, r"quantization='int4'; allowed values"):
      experts_lib.Experts(E, F, quantization='int4').init(jax.random.key(0), jnp.zeros((E, 2, D)))


@pytest.mark.slow
def test_int8_and_bf16_evaluation_of_a_trained_run(tmp_path):
  config = smoke_config()
  config.train.update(num_steps=12, log_every=12, eval_every=12, checkpoint_every=12)
  train.train_and_evaluate(config, str(tmp_path))
  plain = train.evaluate(config, str(tmp_path))
  quantized = train.evaluate(config, str(tmp_path), quantize='int8')
  bf16 = train.evaluate(config, str(tmp_path), precision_name='bf16')
  assert (plain['precision'], plain['quantize']) == ('fp32', 'none')
  assert (quantized['quantize'], bf16['precision']) == ('int8', 'bf16')
  assert quantized['eval_loss'] != plain['eval_loss']
  assert abs(quantized['eval_loss'] / plain['eval_loss'] - 1) < 0.02
  assert abs(bf16['eval_loss'] / plain['eval_loss'] - 1) < 0.02
  ratio = quantized['expert_weight_bytes'] / plain['expert_weight_bytes']
  # A quarter, plus one float32 scale per expert and output channel (wi_0, wi_1: F; wo: D).
  d, f = config.model.d_model, config.model.moe.d_ff
  assert ratio == pytest.approx(0.25 + (2 * f + d) / (3 * d * f))
  with pytest.raises(ValueError, match=r"--precision='fp8'"):
    train.evaluate(config, str(tmp_path), precision_name='fp8')
