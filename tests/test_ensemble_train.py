"""Training ensembles end to end: member x data sharding, resume, kill -9, boosting's freeze."""
import os
import shutil

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import ensemble
from moejax import sharding
from moejax import train
from moejax import workdir as workdir_lib
from test_sharding import load_config
from test_train import assert_killed_steps_redone, kill_and_resume, read_lines, smoke_config_flag
from test_train import subprocess_env, train_command, without_timing


def smoke_config(**ensemble_fields):
  config = load_config('ensemble_tiny', 'smoke')
  config.ensemble.update(ensemble_fields)
  return config


def test_member_by_data_mesh_gives_the_single_device_losses():
  config = smoke_config()
  config.mesh.update(member=2, data=4)
  exp = train._build_experiment(config)  # pylint: disable=protected-access
  batches = [exp.ds.train_batch(step) for step in range(3)]
  step_fn = train.make_train_step(exp.model, exp.tx, exp.schedule, exp.objective)

  with sharding.mesh_context(exp.mesh, exp.rules):
    state = jax.jit(lambda r: nn.unbox(exp.init_fn(r)), out_shardings=exp.state_shardings)(exp.rng)
    batch_sharding = sharding.batch_sharding(exp.mesh, exp.rules, batches[0].shape)
    sharded_step = jax.jit(step_fn, in_shardings=(exp.state_shardings, batch_sharding),
                           out_shardings=(exp.state_shardings, None))
    sharded = []
    for batch in batches:
      state, metrics = sharded_step(state, sharding.global_batch(batch, exp.mesh, exp.rules))
      sharded.append(np.asarray(metrics['member_loss']))
  kernel = state.params['members']['layer_0']['attn']['query']
  assert kernel.sharding.spec[0] == 'member'
  assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.shape[0] == 1

  with jax.default_device(jax.devices()[0]):
    state = jax.jit(lambda r: nn.unbox(exp.init_fn(r)))(exp.rng)
    single_step = jax.jit(step_fn)
    single = []
    for batch in batches:
      state, metrics = single_step(state, jnp.asarray(batch))
      single.append(np.asarray(metrics['member_loss']))
  np.testing.assert_allclose(sharded, single, rtol=2e-5)
  assert not np.allclose(single[0][0], single[0][1])  # two different members


def test_resume_is_bitwise_identical(tmp_path):
  # Boosting by reweighting: member 1's documents are drawn from member 0's losses when its stage
  # starts (step 3); resuming inside that stage (step 4) must draw them again, identically.
  config = smoke_config(method='boosting', boosting='reweight')
  config.train.update(num_steps=6, log_every=2, eval_every=3, checkpoint_every=2)
  full, resumed = str(tmp_path / 'full'), str(tmp_path / 'resumed')
  train.train_and_evaluate(config, full)
  lines = read_lines(full)
  assert len(lines[-2]['member_loss']) == 2
  shutil.copytree(full, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '6'))
  train.train_and_evaluate(config, resumed)
  assert without_timing(read_lines(resumed)) == without_timing(lines)
  _, full_params, _ = workdir_lib.restore_params(full)
  _, resumed_params, _ = workdir_lib.restore_params(resumed)
  chex.assert_trees_all_equal(resumed_params, full_params)


def test_boosting_trains_one_member_at_a_time(tmp_path):
  config = smoke_config(method='boosting', fusion='sum_logits')
  config.train.update(num_steps=4, log_every=1, eval_every=4, checkpoint_every=2)
  config.optim.warmup_steps = 1
  workdir, at_2 = str(tmp_path / 'boost'), str(tmp_path / 'at_2')
  exp = train._build_experiment(config)  # pylint: disable=protected-access
  initial = jax.jit(lambda r: nn.unbox(exp.init_fn(r)))(exp.rng).params
  train.train_and_evaluate(config, workdir)
  shutil.copytree(workdir, at_2)
  shutil.rmtree(os.path.join(at_2, 'checkpoints', '4'))
  params = {step: workdir_lib.restore_params(path)[1] for step, path in ((2, at_2), (4, workdir))}
  member = lambda tree, m: jax.tree.leaves(ensemble.member_params(tree, m))
  changed = lambda a, b: any(not np.array_equal(x, y) for x, y in zip(a, b))
  # Stage 0 (steps 1-2) trains member 0 only; stage 1 (steps 3-4) member 1 only.
  assert changed(member(params[2], 0), member(initial, 0))
  assert not changed(member(params[2], 1), member(initial, 1))
  assert not changed(member(params[4], 0), member(params[2], 0))
  assert changed(member(params[4], 1), member(params[2], 1))
  rates = np.array([line['learning_rate'] for line in read_lines(workdir)
                    if 'learning_rate' in line])  # [steps, M]: each member's own schedule
  np.testing.assert_array_equal(rates[:2, 1], 0.0)
  assert rates[3, 1] > 0


@pytest.mark.slow
def test_sigkill_loses_only_steps_after_the_checkpoint(tmp_path):
  workdir = str(tmp_path / 'run')
  command = train_command(workdir, smoke_config_flag('ensemble_tiny'),
                          '--config.train.num_steps=100000', '--config.train.log_every=2',
                          '--config.train.checkpoint_every=4', '--config.train.eval_every=100000')
  killed_lines, second = kill_and_resume(command, subprocess_env(), workdir, timeout=300)
  second.kill()
  second.wait()
  assert_killed_steps_redone(workdir, killed_lines)
