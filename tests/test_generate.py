"""Tests for moejax.generate: the KV cache reproduces the full forward pass; sampling rules."""
import functools

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from moejax import config_files
from moejax import data
from moejax import generate as generate_lib
from moejax import model as model_lib
from moejax import precision

B, P, N = 2, 3, 5  # P = 3 matches sample_text('ab') (EOD + 2 bytes): one compile

moe_tiny = config_files.load_module('moe_tiny')


@functools.lru_cache(maxsize=None)
def _init(num_layers=2):
  """(model, params, jitted apply): D=32, MoE layers of 4 experts, byte vocab, max_seq_len=16.

  One model for every test: compiling an init costs seconds on CPU, and the dense FFN does not
  touch the decoding path (tests/test_model.py covers it).
  """
  config = moe_tiny.get_config('smoke').model
  config.update(vocab_size=257, d_model=32, num_layers=num_layers, num_heads=2, d_ff=64,
                max_seq_len=16)
  config.moe.update(dispatch='ragged', num_experts=4, top_k=2, d_ff=16)
  model = model_lib.build_model(config, precision.get_policy('fp32'))
  params = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 16), jnp.int32))['params']
  return model, params, jax.jit(model.apply)


def _tokens(length, seed=0):
  return jax.random.randint(jax.random.key(seed), (B, length), 0, 64, jnp.int32)


class DecodeTest(parameterized.TestCase):

  def test_cached_decoding_matches_full_forward(self):
    model, params, forward = _init()
    tokens = _tokens(P + N)
    full_logits, _ = forward({'params': params}, tokens)
    cache = generate_lib.init_cache(model, B, 12)  # longer than used: unwritten slots are masked
    chex.assert_shape(cache['layer_1']['attn']['cached_key'], (B, 2, 12, 16))
    chex.assert_shape(cache['layer_1']['attn']['cached_value'], (B, 2, 12, 16))
    decode = jax.jit(functools.partial(model.apply, decode=True, mutable=['cache']))
    step_logits = []
    # Prefill 3 tokens at once, then one token per call (teacher forcing).
    chunks = [tokens[:, :3]] + [tokens[:, t:t + 1] for t in range(3, P + N)]
    for chunk in chunks:
      (logits, _), state = decode({'params': params, 'cache': cache}, chunk)
      cache = state['cache']
      step_logits.append(logits)
    np.testing.assert_allclose(jnp.concatenate(step_logits, axis=1), full_logits,
                               rtol=1e-5, atol=1e-5)
    self.assertEqual(int(cache['layer_0']['attn']['cache_index']), P + N)


class GenerateTest(parameterized.TestCase):

  def test_greedy_equals_argmax_of_full_forward(self):
    model, params, forward = _init()
    prompt = _tokens(P)
    out = generate_lib.generate(model, params, prompt, N, jax.random.key(0), temperature=0.0)
    chex.assert_shape(out, (B, P + N))
    chex.assert_type(out, jnp.int32)
    np.testing.assert_array_equal(out[:, :P], prompt)
    logits, _ = forward({'params': params}, out)
    np.testing.assert_array_equal(out[:, P:], jnp.argmax(logits[:, P - 1:-1], axis=-1))
    again = generate_lib.generate(model, params, prompt, N, jax.random.key(7), temperature=0.0)
    np.testing.assert_array_equal(out, again)

  def test_router_state_reaches_decoding(self):
    """An aux-free model routes with its learned bias when sampling, as in the full forward."""
    config = moe_tiny.get_config('smoke').model
    config.update(vocab_size=257, d_model=32, num_layers=2, num_heads=2, d_ff=64, max_seq_len=16)
    config.moe.update(router='aux_free', dispatch='ragged', num_experts=4, top_k=2, d_ff=16)
    model = model_lib.build_model(config, precision.get_policy('fp32'))
    variables = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 16), jnp.int32))
    params = variables['params']
    bias = jax.tree.map(lambda b: b + jnp.arange(b.shape[0]) * 0.5, variables['router_state'])
    prompt = _tokens(P)
    out = generate_lib.generate(model, params, prompt, N, jax.random.key(0), temperature=0.0,
                                router_state=bias)
    logits, _ = model.apply({'params': params, 'router_state': bias}, out)
    np.testing.assert_array_equal(out[:, P:], jnp.argmax(logits[:, P - 1:-1], axis=-1))
    unbiased = generate_lib.generate(model, params, prompt, N, jax.random.key(0), temperature=0.0,
                                     router_state=variables['router_state'])
    self.assertFalse(np.array_equal(out, unbiased))  # the bias changes which experts run

  def test_top_k_1_equals_greedy(self):
    model, params, _ = _init()
    prompt = _tokens(P, seed=3)
    greedy = generate_lib.generate(model, params, prompt, N, jax.random.key(0), temperature=0.0)
    top1 = generate_lib.generate(model, params, prompt, N, jax.random.key(5), temperature=1.0,
                                 top_k=1)
    np.testing.assert_array_equal(top1, greedy)

  def test_sampling_depends_on_rng_and_is_reproducible(self):
    model, params, _ = _init()
    prompt = _tokens(P)
    sample = functools.partial(generate_lib.generate, model, params, prompt, N, temperature=2.0)
    a, b, c = sample(jax.random.key(0)), sample(jax.random.key(0)), sample(jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    self.assertFalse(np.array_equal(a, c))
    self.assertTrue(bool(jnp.all((a >= 0) & (a < 257))))

  def test_past_max_seq_len_attends_over_a_sliding_window(self):
    # One layer: with more, a cached key already summarises tokens before the window (as in
    # Mistral's sliding window), so only a one-layer model equals a fresh pass over the window.
    model, params, forward = _init(num_layers=1)  # max_seq_len R = 16
    window, prompt = 16, _tokens(P)
    out = generate_lib.generate(model, params, prompt, 22, jax.random.key(0), temperature=0.0)
    chex.assert_shape(out, (B, P + 22))
    # RoPE scores depend on position differences only: token t is the argmax of a full forward
    # pass over the R tokens before it, wherever the window sits.
    for t in (window, window + 4, P + 21):
      logits, _ = forward({'params': params}, out[:, t - window:t])
      np.testing.assert_array_equal(out[:, t], jnp.argmax(logits[:, -1], axis=-1))
    # A prompt longer than the window continues from its last R tokens.
    longer = generate_lib.generate(model, params, out[:, :20], 2, jax.random.key(0),
                                   temperature=0.0)
    np.testing.assert_array_equal(longer, out[:, :22])

  def test_zero_new_tokens_returns_prompt(self):
    model, params, _ = _init()
    prompt = _tokens(P)
    np.testing.assert_array_equal(
        generate_lib.generate(model, params, prompt, 0, jax.random.key(0)), prompt)

  @parameterized.named_parameters(
      ('temperature', dict(temperature=-1.0), 'temperature'),
      ('top_k', dict(top_k=258), 'top_k'),
      ('negative_tokens', dict(num_new_tokens=-1), 'num_new_tokens'),
  )
  def test_bad_arguments_raise(self, overrides, message):
    model, params, _ = _init()
    kwargs = dict(num_new_tokens=N, temperature=1.0, top_k=0) | overrides
    with self.assertRaisesRegex(ValueError, message):
      generate_lib.generate(model, params, _tokens(P), rng=jax.random.key(0), **kwargs)

  def test_sample_text(self):
    model, params, _ = _init()
    text = generate_lib.sample_text(model, params, 'ab', N, seed=0, temperature=0.0)
    tokens = generate_lib.generate(model, params, [[256, 97, 98]], N, jax.random.key(0),
                                   temperature=0.0)
    self.assertEqual(text, data.decode(tokens[0]))
    self.assertTrue(text.startswith('ab'))


class SampleLogitsTest(parameterized.TestCase):

  def test_top_k_only_draws_the_k_most_likely(self):
    logits = jnp.log(jnp.array([[0.1, 0.4, 0.05, 0.3, 0.15]] * 512))
    tokens = generate_lib.sample_logits(logits, jax.random.key(0), temperature=1.0, top_k=2)
    self.assertEqual(set(np.asarray(tokens).tolist()), {1, 3})

  def test_greedy(self):
    logits = jnp.array([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    np.testing.assert_array_equal(
        generate_lib.sample_logits(logits, jax.random.key(0), temperature=0.0), [1, 0])

  def test_temperature_sharpens(self):
    logits = jnp.log(jnp.array([[0.6, 0.4]] * 2000))
    cold = generate_lib.sample_logits(logits, jax.random.key(0), temperature=0.25)
    # p(0) = 0.6^4 / (0.6^4 + 0.4^4) = 0.835 at temperature 1/4.
    np.testing.assert_allclose(jnp.mean(cold == 0), 0.835, atol=0.03)
