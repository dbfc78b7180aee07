"""A tiny LM with given weights and its train step, shared by the reference tests.

Shapes: B batch, S seq, V vocab.

`tiny_config` is the moe_tiny smoke config shrunk further: layer 0 a dense SwiGLU FFN, layer 1 an
MoE layer (4 experts, top-2, dropless), so one model holds every piece of maths the references
recompute. `given_params` fills the model's parameter tree from numpy (float64; the tests cast
them to the model's dtype); norm scales are not all ones, so a dropped scale shows.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax import config_files
from moejax import model as model_lib
from moejax import precision
from moejax import train


def experiment_config(name='moe_tiny', arg='smoke'):
  return config_files.get_config(name, arg)


def tiny_config(vocab_size=40, seq_len=8, batch_size=2, policy='fp32', router='top_k'):
  """D=16, H=2 (N=8), 2 layers (dense then MoE: E=4, K=2, F=8), S=8, lr schedule over 200 steps."""
  config = experiment_config()
  config.model.update(vocab_size=vocab_size, d_model=16, num_layers=2, num_heads=2, d_ff=24,
                      max_seq_len=seq_len, first_dense_layers=1, rope_base=100.0)
  config.model.moe.update(num_experts=4, top_k=2, d_ff=8, dispatch='ragged', router=router,
                          load_balance_weight=0.3, z_loss_weight=0.05, jitter_noise=0.0)
  config.data.update(seq_len=seq_len, batch_size=batch_size, eval_batch_size=batch_size)
  config.train.update(num_steps=200)
  config.optim.update(learning_rate=1e-2, warmup_steps=2, end_lr_ratio=0.1, weight_decay=0.1,
                      b1=0.9, b2=0.95, eps=1e-8, grad_clip=0.0)
  config.precision.policy = policy
  return config


def build_model(config):
  return model_lib.build_model(config.model, precision.get_policy(config.precision.policy))


def given_params(config, seed=0):
  """{params} as float64 numpy arrays in the model's tree, drawn from N(0, 1/fan_in)."""
  model = build_model(config)
  tokens = jax.ShapeDtypeStruct((1, config.data.seq_len), jnp.int32)
  abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))['params']
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if 'scale' in name:  # norm scales
      return 1.0 + 0.2 * rng.standard_normal(leaf.shape)
    if 'embedding' in name:
      return rng.standard_normal(leaf.shape)
    if name.endswith(("['query']", "['key']", "['value']")):  # [D, H, N]
      fan_in = leaf.shape[0]
    elif name.endswith("['out']"):  # [H, N, D]
      fan_in = leaf.shape[0] * leaf.shape[1]
    else:  # [D, X] and expert stacks [E, D or F, X]
      fan_in = leaf.shape[-2]
    return rng.standard_normal(leaf.shape) / np.sqrt(fan_in)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def random_batch(config, seed=0, batch_size=None):
  """int32 [B, S+1] tokens."""
  rng = np.random.default_rng(seed)
  shape = (batch_size or config.data.batch_size, config.data.seq_len + 1)
  return rng.integers(0, config.model.vocab_size, shape).astype(np.int32)


def to_model_dtype(tree, dtype=np.float32):
  return jax.tree.map(lambda a: jnp.asarray(np.asarray(a, dtype)), tree)


def train_state(config, params, tx):
  """A step-0 TrainState holding `params` (float64 numpy, cast to the param dtype).

  Built from its fields rather than by `make_init_fn`, whose model.init costs seconds to compile.
  """
  model = build_model(config)
  tokens = jax.ShapeDtypeStruct((1, config.data.seq_len), jnp.int32)
  abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))
  params = jax.tree.map(lambda a, like: jnp.asarray(a, like.dtype), params, abstract['params'])
  router_state = jax.tree.map(lambda like: jnp.zeros(like.shape, like.dtype),
                              abstract.get('router_state', {}))
  prec = config.precision
  return train.TrainState(
      step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params),
      router_state=dict(router_state), rng=jax.random.PRNGKey(config.seed),
      loss_scale=precision.loss_scale_for(prec.policy, prec.loss_scale_init,
                                          prec.loss_scale_period),
      nonfinite_count=jnp.zeros([], jnp.int32), skipped_steps=jnp.zeros([], jnp.int32))


def jit_train_step(config, tx=None):
  """(jitted step (state, batch) -> (state, metrics), tx) for `config`; tx defaults to its AdamW."""
  model = build_model(config)
  own_tx, schedule = train.make_optimizer(config)
  tx = tx or own_tx
  return jax.jit(train.make_train_step(model, tx, schedule)), tx


def flat(tree):
  """{'a/b/c': float64 array} of a nested dict tree."""
  return {jax.tree_util.keystr(path): np.asarray(leaf, np.float64)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
