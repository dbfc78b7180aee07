"""Tests for moejax/checkpoint.py: round trip, retention, atomicity, sharded restore, stop-signal flag."""
import os
import shutil
import signal
import time

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import checkpoint


@flax.struct.dataclass
class State:
  step: jax.Array
  params: dict
  rng: jax.Array


def make_state(step, n=None):
  n = n or 2 * len(jax.devices())
  params = {'w': jnp.arange(n * 3, dtype=jnp.float32).reshape(n, 3) * step, 'b': jnp.full((3,), step, jnp.bfloat16)}
  return State(step=jnp.int32(step), params=params, rng=jax.random.key(step))


def abstract(state, sharding_fn=None):
  device = jax.devices()[0]
  sharding_fn = sharding_fn or (lambda x: jax.sharding.SingleDeviceSharding(device))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_fn(x)), state)


def assert_states_equal(got, want):
  assert type(got) is type(want)
  np.testing.assert_array_equal(jax.random.key_data(got.rng), jax.random.key_data(want.rng))
  chex.assert_trees_all_equal(got.params, want.params)
  chex.assert_trees_all_equal_dtypes(got.params, want.params)
  assert int(got.step) == int(want.step)


def test_save_restore_round_trip(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path / 'checkpoints')
  assert ckpt.latest_step() is None
  assert ckpt.restore_latest(abstract(make_state(1))) == (None, None)
  assert ckpt.save(1, make_state(1))
  assert ckpt.save(2, make_state(2), metrics={'eval_loss': jnp.float32(1.5), 'expert_fraction': jnp.full(2, 0.5)})
  assert not ckpt.save(2, make_state(3))  # a step is saved once
  ckpt.wait()
  # orbax marks finished steps; the Checkpointer relies on that marker.
  assert os.path.exists(tmp_path / 'checkpoints' / '2' / checkpoint.COMMIT_MARKER)
  assert ckpt.latest_step() == 2 and ckpt.all_steps() == [1, 2]
  assert ckpt.metrics(2) == {'eval_loss': 1.5, 'expert_fraction': [0.5, 0.5]}
  step, restored = ckpt.restore_latest(abstract(make_state(0)))
  assert step == 2
  assert_states_equal(restored, make_state(2))
  assert_states_equal(ckpt.restore(1, abstract(make_state(0))), make_state(1))
  ckpt.close()

  reopened = checkpoint.Checkpointer(tmp_path / 'checkpoints', async_save=False)
  assert reopened.latest_step() == 2
  assert_states_equal(reopened.restore(2, abstract(make_state(0))), make_state(2))
  reopened.close()


def test_keeps_last_n_plus_best(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, keep=2, keep_best=True)
  eval_losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: None, 5: 2.5, 6: None, 7: 4.0}
  for step, loss in eval_losses.items():
    ckpt.save(step, make_state(step), metrics=None if loss is None else {'eval_loss': loss})
  ckpt.wait()
  assert ckpt.all_steps() == [2, 6, 7]
  assert ckpt.best_step() == 2
  assert sorted(os.listdir(tmp_path)) == ['2', '6', '7']
  ckpt.close()

  without_best = checkpoint.Checkpointer(tmp_path / 'plain', keep=2, keep_best=False)
  for step, loss in eval_losses.items():
    without_best.save(step, make_state(step), metrics=None if loss is None else {'eval_loss': loss})
  without_best.close()
  assert checkpoint.Checkpointer(tmp_path / 'plain', keep=2).all_steps() == [6, 7]


def test_best_needs_the_metric(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path)
  with pytest.raises(ValueError, match="lack 'eval_loss'"):
    ckpt.save(1, make_state(1), metrics={'loss': 1.0})
  ckpt.close()
  with pytest.raises(ValueError, match='keep must be >= 1'):
    checkpoint.Checkpointer(tmp_path, keep=0)


def test_half_written_checkpoints_are_never_used(tmp_path):
  directory = tmp_path / 'checkpoints'
  ckpt = checkpoint.Checkpointer(directory, async_save=False)
  ckpt.save(1, make_state(1))
  ckpt.save(2, make_state(2))
  ckpt.close()
  # A save killed before orbax's rename leaves a tmp directory; one killed before the commit marker (filesystems
  # without atomic rename) leaves a step directory without it.
  shutil.copytree(directory / '2', directory / '3.orbax-checkpoint-tmp-1234567')
  shutil.copytree(directory / '2', directory / '4')
  os.remove(directory / '4' / checkpoint.COMMIT_MARKER)

  # A reader (evaluate, generate) ignores the debris but deletes nothing: it may be a save in flight.
  reader = checkpoint.Checkpointer(directory, read_only=True)
  assert reader.latest_step() == 2
  assert_states_equal(reader.restore_latest(abstract(make_state(0)))[1], make_state(2))
  with pytest.raises(ValueError, match='read_only'):
    reader.save(5, make_state(5))
  reader.close()
  assert sorted(os.listdir(directory)) == ['1', '2', '3.orbax-checkpoint-tmp-1234567', '4']

  ckpt = checkpoint.Checkpointer(directory, async_save=False)
  assert ckpt.latest_step() == 2
  step, restored = ckpt.restore_latest(abstract(make_state(0)))
  assert step == 2
  assert_states_equal(restored, make_state(2))
  with pytest.raises(ValueError, match='no complete checkpoint for step 4'):
    ckpt.restore(4, abstract(make_state(0)))
  # The debris does not block saving those steps again.
  assert ckpt.save(3, make_state(3)) and ckpt.save(4, make_state(4))
  assert ckpt.all_steps() == [2, 3, 4]
  assert_states_equal(ckpt.restore(4, abstract(make_state(0))), make_state(4))
  ckpt.close()


def test_restore_onto_explicit_sharding(tmp_path):
  devices = jax.devices()
  mesh = jax.make_mesh((len(devices),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  row_sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  ckpt = checkpoint.Checkpointer(tmp_path)
  ckpt.save(7, make_state(7))
  ckpt.wait()
  target = abstract(make_state(0), lambda x: row_sharded if x.ndim == 2 else replicated)
  restored = ckpt.restore(7, target)
  assert_states_equal(restored, make_state(7))
  assert restored.params['w'].sharding == row_sharded
  assert restored.params['b'].sharding == replicated
  ckpt.close()


def test_stop_flag_sigterm_and_sigint_and_a_second_ctrl_c_is_the_default_action():
  previous = {sig: signal.getsignal(sig) for sig in checkpoint.STOP_SIGNALS}
  try:
    for sig in checkpoint.STOP_SIGNALS:
      received = checkpoint.install_stop_flag()
      assert not received()
      os.kill(os.getpid(), sig)
      deadline = time.time() + 5
      while not received() and time.time() < deadline:
        time.sleep(0.01)
      assert received()
    # After the first Ctrl-C the next one is the system's: the process ends at once.
    assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, previous[signal.SIGTERM])
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def test_reached_preemption_is_false_without_a_preemption(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path)
  assert ckpt.reached_preemption(0) is False
  ckpt.close()


def test_restore_fields_returns_only_the_named_fields(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path / 'checkpoints', async_save=False)
  ckpt.save(2, make_state(2))
  target = abstract(make_state(0))
  # On the writer that saved it, and on a reader.
  for source in (ckpt, checkpoint.Checkpointer(tmp_path / 'checkpoints', read_only=True)):
    restored = source.restore_fields(2, {'params': target.params})
    assert list(restored) == ['params']
    chex.assert_trees_all_equal(restored['params'], make_state(2).params)
    chex.assert_trees_all_equal_dtypes(restored['params'], make_state(2).params)
    with pytest.raises(ValueError, match='no complete checkpoint for step 3'):
      source.restore_fields(3, {'params': target.params})
    with pytest.raises(ValueError, match=r"has no \['optimizer'\]\['b'\], \['optimizer'\]\['w'\]$"):
      source.restore_fields(2, {'optimizer': target.params})
    source.close()
