"""The train step against a hand-computed AdamW, under fp16 loss scaling, on skipped steps; and
that training learns.

Shapes: B batch, S seq.

Adam divides by the gradient's own scale, so a gradient off by a constant factor (never unscaled
under fp16) barely moves the update; these tests compare the gradient norm and use an eps large
enough for the factor to show. References: tests/numpy_reference.py.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import data as data_lib
from moejax import train
import numpy_reference as ref  # tests/ is on sys.path under pytest
import tiny_lm


def reference_grad_fn(batch):
  """params (float64 tree) -> (objective, gradient) of the reference objective on `batch`."""
  def objective(params):
    return ref.lm_objective(jnp, params, batch, num_layers=2, rope_base=100.0, top_k=2,
                            load_balance_weight=0.3, z_loss_weight=0.05)[0]
  grad = jax.jit(jax.value_and_grad(objective))

  def call(params):
    with jax.enable_x64(True):
      value, grads = grad(jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params))
      return float(value), jax.tree.map(np.asarray, grads)
  return call


def assert_bitwise_equal(got, want, what):
  got, want = jax.device_get((got, want))
  leaves_got, leaves_want = jax.tree.leaves(got), jax.tree.leaves(want)
  assert jax.tree.structure(got) == jax.tree.structure(want), what
  for a, b in zip(leaves_got, leaves_want):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), what


def test_three_steps_equal_a_hand_computed_adamw():
  """Warmup (lr 0, then half, then full), global-norm clipping that bites, decoupled weight
  decay on matrices but not on the embedding or the norm scales."""
  config = tiny_lm.tiny_config()
  params = tiny_lm.given_params(config)
  batch = tiny_lm.random_batch(config, seed=1)
  grad_fn = reference_grad_fn(batch)
  _, first_grads = grad_fn(params)
  first_norm = np.sqrt(sum((g * g).sum() for g in tiny_lm.flat(first_grads).values()))
  optim = config.optim
  optim.update(eps=1e-4, grad_clip=float(0.5 * first_norm))
  step, tx = tiny_lm.jit_train_step(config)
  state = tiny_lm.train_state(config, params, tx)

  flat_params = tiny_lm.flat(params)
  decay = {name: value.ndim >= 2 and 'embedding' not in name
           for name, value in flat_params.items()}
  assert sum(decay.values()) and not all(decay.values())
  mu = {name: np.zeros_like(v) for name, v in flat_params.items()}
  nu = {name: np.zeros_like(v) for name, v in flat_params.items()}
  hand_lr = [0.0, optim.learning_rate / 2, optim.learning_rate]  # linear warmup over 2 steps
  want = flat_params
  for t, lr in enumerate(hand_lr):
    state, metrics = step(state, jnp.asarray(batch))
    _, grads = grad_fn(jax.tree_util.tree_unflatten(
        jax.tree.structure(params), [want[name] for name in tiny_lm.flat(params)]))
    grads = tiny_lm.flat(grads)
    norm = np.sqrt(sum((g * g).sum() for g in grads.values()))
    np.testing.assert_allclose(metrics['grad_norm'], norm, rtol=1e-4)
    np.testing.assert_allclose(metrics['learning_rate'], lr, rtol=1e-6)
    assert norm > optim.grad_clip  # clipping is active
    want, mu, nu = ref.adamw_step(want, grads, mu, nu, t, lr=lr, b1=optim.b1, b2=optim.b2,
                                  eps=optim.eps, weight_decay=optim.weight_decay, decay=decay,
                                  clip=optim.grad_clip)
  got = tiny_lm.flat(state.params)
  moved = 0.0
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=2e-6, err_msg=name)
    moved = max(moved, float(np.abs(want[name] - flat_params[name]).max()))
  assert moved > 1e-3


def test_fp16_update_equals_fp32_update():
  """Under fp16 the gradients come back unscaled: the same grad norm and, with an eps that does
  not hide a constant factor, the same update as fp32 within fp16's precision."""
  updates, norms = {}, {}
  for policy in ('fp32', 'fp16'):
    config = tiny_lm.tiny_config(policy=policy)
    config.optim.update(warmup_steps=0, eps=1e-3)
    config.precision.loss_scale_init = 2.0**10
    params = tiny_lm.given_params(config)
    step, tx = tiny_lm.jit_train_step(config)
    state = tiny_lm.train_state(config, params, tx)
    new_state, metrics = step(state, jnp.asarray(tiny_lm.random_batch(config, seed=2)))
    assert int(metrics['skipped']) == 0, policy
    norms[policy] = float(metrics['grad_norm'])
    before, after = tiny_lm.flat(state.params), tiny_lm.flat(new_state.params)
    updates[policy] = np.concatenate([(after[k] - before[k]).ravel() for k in sorted(after)])
  np.testing.assert_allclose(norms['fp16'], norms['fp32'], rtol=2e-2)
  difference = np.linalg.norm(updates['fp16'] - updates['fp32'])
  assert difference < 3e-2 * np.linalg.norm(updates['fp32']), difference


@pytest.fixture(scope='module')
def aux_free_step():
  """(config, jitted step, tx) of the tiny LM with the aux-free router (it has router state)."""
  config = tiny_lm.tiny_config(router='aux_free')
  config.model.moe.aux_free_bias_rate = 0.01
  step, tx = tiny_lm.jit_train_step(config)
  return config, step, tx


def test_a_skipped_step_leaves_params_optimizer_and_router_state_bit_identical(aux_free_step):
  config, step, tx = aux_free_step
  state = tiny_lm.train_state(config, tiny_lm.given_params(config), tx)
  batch = tiny_lm.random_batch(config, seed=3)
  state, metrics = step(state, jnp.asarray(batch))
  assert int(metrics['skipped']) == 0
  bias = state.router_state['layer_1']['ffn']['router']['bias']
  assert np.abs(np.asarray(bias)).max() > 0  # a finite step moves the router state

  before = jax.device_get(state)
  poisoned = batch.copy()
  poisoned[:, 3] = config.model.vocab_size  # out of vocabulary: the embedding lookup gives NaN
  after, metrics = step(state, jnp.asarray(poisoned))
  assert int(metrics['skipped']) == 1 and int(after.step) == int(before.step) + 1
  assert_bitwise_equal(after.params, before.params, 'params')
  assert_bitwise_equal(after.opt_state, before.opt_state, 'optimizer state')
  assert_bitwise_equal(after.router_state, before.router_state, 'router state')


def test_a_repeated_pattern_is_learned_to_near_zero_loss(aux_free_step):
  """Rows of a period-5 token cycle at random phases: every next token is determined by the
  current one, so the loss must approach 0."""
  config, step, tx = aux_free_step
  state = tiny_lm.train_state(config, tiny_lm.given_params(config), tx)
  rng = np.random.default_rng(0)
  cycle = np.array([7, 3, 11, 29, 5])
  losses = []
  for _ in range(60):
    phase = rng.integers(0, 5, size=(config.data.batch_size, 1))
    batch = cycle[(phase + np.arange(config.data.seq_len + 1)) % 5].astype(np.int32)
    state, metrics = step(state, jnp.asarray(batch))
    losses.append(float(metrics['loss']))
  assert losses[0] > 2.0
  assert np.mean(losses[-5:]) < 0.05, losses[-5:]


@pytest.mark.slow
def test_default_corpus_loss_falls_over_the_first_50_steps(tmp_path):
  config = tiny_lm.experiment_config()
  config.train.update(num_steps=50, log_every=5, eval_every=50, eval_steps=1,
                      checkpoint_every=50)
  result = train.train_and_evaluate(config, str(tmp_path))
  with open(os.path.join(tmp_path, 'metrics.jsonl')) as f:
    losses = [line['loss'] for line in map(json.loads, f) if 'loss' in line]
  assert len(losses) == 10
  uniform = np.log(data_lib.VOCAB_SIZE)
  assert losses[0] > 0.8 * uniform
  assert losses[-1] < losses[0] - 1.0, losses
  assert result['eval_loss'] < uniform - 1.0
