"""The Transformer and its objective against independent float64 references (numpy_reference.py).

Shapes: B batch, S seq, D d_model, H heads, N head_dim, V vocab.

The other model tests compare the model with itself (cached vs full, remat vs plain); a bug made
the same way everywhere passes them. Here every piece is recomputed from its formula: RMSNorm,
RoPE, causal attention (scale 1/sqrt(N)), the SwiGLU FFN, the MoE layer and its aux losses, the
whole LM's logits, the next-token objective with its weighted aux losses and its gradient, and
bits per byte from a hand count.
"""
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from moejax import data as data_lib
from moejax import model as model_lib
from moejax import train
import numpy_reference as ref  # tests/ is on sys.path under pytest
import tiny_lm

RTOL, ATOL = 2e-5, 2e-5  # float32 model vs float64 reference


def x64_grad(fn, params):
  """jax.grad of a reference function in float64."""
  with jax.enable_x64(True):
    params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    return jax.tree.map(np.asarray, jax.jit(jax.grad(fn))(params64))


class PiecesTest(parameterized.TestCase):
  """Each sub-layer alone, with given weights."""

  def setUp(self):
    super().setUp()
    self.config = tiny_lm.tiny_config()
    self.params = tiny_lm.given_params(self.config)
    self.x = np.random.default_rng(1).standard_normal((2, 8, 16))

  def test_rms_norm(self):
    scale = self.params['layer_0']['attn_norm']['scale']
    got = jax.jit(model_lib.RMSNorm().apply)({'params': {'scale': jnp.float32(scale)}},
                                             jnp.float32(self.x))
    np.testing.assert_allclose(got, ref.rms_norm(np, self.x, scale), rtol=RTOL, atol=ATOL)

  def test_rope(self):
    x = self.x.reshape(2, 8, 2, 8)  # [B, S, H, N]; the model rotates heads-major [B, H, S, N]
    got = model_lib.apply_rope(jnp.float32(x.swapaxes(1, 2)), jnp.arange(8), 100.0).swapaxes(1, 2)
    np.testing.assert_allclose(got, ref.rope(np, x, 100.0), rtol=RTOL, atol=ATOL)
    # Position 0 is not rotated; later positions are.
    np.testing.assert_allclose(got[:, 0], x[:, 0], rtol=RTOL, atol=ATOL)
    self.assertGreater(float(np.abs(got[:, 5] - x[:, 5]).max()), 0.1)

  def test_causal_attention(self):
    p = self.params['layer_0']['attn']
    attention = model_lib.CausalSelfAttention(num_heads=2, rope_base=100.0)
    got = jax.jit(attention.apply)({'params': tiny_lm.to_model_dtype(p)}, jnp.float32(self.x))
    np.testing.assert_allclose(got, ref.causal_attention(np, self.x, p, 100.0),
                               rtol=RTOL, atol=ATOL)

  @parameterized.parameters((0, False), (1, True))
  def test_block(self, layer, use_moe):
    cfg = ml_collections.FrozenConfigDict(self.config.model)
    p = self.params[f'layer_{layer}']
    got, aux = jax.jit(model_lib.Block(cfg, use_moe).apply)(
        {'params': tiny_lm.to_model_dtype(p)}, jnp.float32(self.x))
    want, want_aux = ref.block(np, self.x, p, 100.0, top_k=2)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    if use_moe:
      (lb, z), = want_aux
      np.testing.assert_allclose(aux['load_balance_loss'], lb, rtol=RTOL)
      np.testing.assert_allclose(aux['router_z_loss'], z, rtol=RTOL)


class LanguageModelTest(parameterized.TestCase):
  """The whole LM's logits and the training objective with given weights."""

  @parameterized.parameters(False, True)
  def test_logits_and_aux(self, tie_embeddings):
    config = tiny_lm.tiny_config()
    config.model.tie_embeddings = tie_embeddings
    params = tiny_lm.given_params(config)
    self.assertEqual('logits' in params, not tie_embeddings)
    tokens = tiny_lm.random_batch(config)[:, :-1]
    logits, aux = jax.jit(tiny_lm.build_model(config).apply)(
        {'params': tiny_lm.to_model_dtype(params)}, jnp.asarray(tokens))
    want, want_aux = ref.lm_logits(np, params, tokens, num_layers=2, rope_base=100.0, top_k=2)
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
    (lb, z), = want_aux  # layer 1 is the only MoE layer
    np.testing.assert_allclose(aux['load_balance_loss'], lb, rtol=1e-5)
    np.testing.assert_allclose(aux['router_z_loss'], z, rtol=1e-5)
    np.testing.assert_allclose(aux['aux_loss'], 0.3 * lb + 0.05 * z, rtol=1e-5)

  def test_train_step_objective_and_gradient(self):
    """The train step's loss is next-token CE, its gradient that of CE + weighted aux losses.

    The optimizer here keeps the gradient as its state and applies nothing, so the step's
    gradient can be read back exactly.
    """
    config = tiny_lm.tiny_config()
    params = tiny_lm.given_params(config)
    batch = tiny_lm.random_batch(config, batch_size=4)
    _, schedule = train.make_optimizer(config)
    keep_grads = optax.GradientTransformation(
        init=lambda p: jax.tree.map(jnp.zeros_like, p),
        update=lambda g, state, p=None: (jax.tree.map(jnp.zeros_like, g), g))
    tx = optax.chain(keep_grads, optax.scale_by_learning_rate(schedule))
    step, _ = tiny_lm.jit_train_step(config, tx)
    state, metrics = step(tiny_lm.train_state(config, params, tx), jnp.asarray(batch))
    grads = state.opt_state[0]

    objective = lambda xp, p: ref.lm_objective(
        xp, p, batch, num_layers=2, rope_base=100.0, top_k=2, load_balance_weight=0.3,
        z_loss_weight=0.05)
    total, ce, aux_loss = objective(np, params)
    np.testing.assert_allclose(metrics['loss'], ce, rtol=1e-5)
    np.testing.assert_allclose(metrics['aux_loss'], aux_loss, rtol=1e-5)
    self.assertGreater(aux_loss, 0.05 * ce)  # the aux term is big enough to show in the gradient
    want = x64_grad(lambda p: objective(jnp, p)[0], params)
    got, want = tiny_lm.flat(grads), tiny_lm.flat(want)
    self.assertEqual(set(got), set(want))
    for name in want:
      np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(
        metrics['grad_norm'], np.sqrt(sum((g * g).sum() for g in want.values())), rtol=1e-5)


def test_bits_per_byte_from_a_hand_count(tmp_path):
  """A model that predicts one fixed distribution q for every byte: its eval bits per byte must be
  -Σ_b n_b log2 q_b / N over the N target bytes of the eval batches, n_b counted by hand.

  All blocks add zero (zero output kernels) and every token embeds to the same vector, so the
  logits are the same at every position: q = softmax(final_norm(e) @ W).
  """
  (tmp_path / 'a.txt').write_bytes(b'abracadabra, said the wizard. ' * 40)
  (tmp_path / 'b.txt').write_bytes(b'hocus pocus!\n' * 50)
  config = tiny_lm.tiny_config(vocab_size=data_lib.VOCAB_SIZE, seq_len=8, batch_size=4)
  config.data.update(corpus='text', paths=str(tmp_path / '*.txt'), val_fraction=0.5)
  config.train.eval_steps = 3
  ds = data_lib.make_dataset(config.data, config.seed, config.model.vocab_size)
  batches = ds.eval_batches(config.train.eval_steps)

  params = tiny_lm.given_params(config)
  kernel = np.random.default_rng(3).standard_normal((16, data_lib.VOCAB_SIZE))

  def place(path, leaf):
    name = jax.tree_util.keystr(path)
    if 'scale' in name:
      return np.ones_like(leaf)
    if 'embedding' in name:
      return np.ones_like(leaf)
    if name.endswith("['logits']"):
      return kernel
    if name.endswith(("['out']", "['wo']")):
      return np.zeros_like(leaf)
    return leaf
  params = jax.tree_util.tree_map_with_path(place, params)
  log_q = kernel.sum(axis=0) - np.log(np.exp(kernel.sum(axis=0)).sum())  # final_norm(1) = 1

  counts = np.zeros(data_lib.VOCAB_SIZE)
  for batch in batches:
    for target in batch[:, 1:].reshape(-1):
      counts[target] += 1
  want = -(counts * log_q).sum() / counts.sum() / np.log(2)

  model = tiny_lm.build_model(config)
  tx, _ = train.make_optimizer(config)
  state = tiny_lm.train_state(config, params, tx)
  got = train.run_eval(jax.jit(train.make_eval_step(model)), state,
                       [jnp.asarray(b) for b in batches], ds.bytes_per_token)
  np.testing.assert_allclose(got['eval_bits_per_byte'], want, rtol=1e-5)
  np.testing.assert_allclose(got['eval_loss'], want * np.log(2), rtol=1e-5)
  np.testing.assert_allclose(got['eval_perplexity'], np.exp(want * np.log(2)), rtol=1e-5)
