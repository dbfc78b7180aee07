"""Tests for moejax.train: optimizer pieces, the pure train step, and the loop end to end.

The loop tests train the moe_tiny smoke config (D=32, 2 layers, S=32) for a dozen steps.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax import checkpoint
from moejax import config_files
from moejax import data as data_lib
from moejax import ensemble
from moejax import evaluation
from moejax import model as model_lib
from moejax import objective as objective_lib
from moejax import precision
from moejax import sharding
from moejax import train
from moejax import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = ('step_time', 'tokens_per_s', 'mfu', 'flops_per_step')


def smoke_config(**train_overrides):
  config = config_files.get_config('moe_tiny:smoke')
  config.train.update(train_overrides)
  return config


def read_lines(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def without_timing(lines):
  return [{k: v for k, v in line.items() if k not in TIMING_KEYS} for line in lines]


def single_device_state(config):
  """(model, tx, schedule, unboxed state) on the default device, outside any mesh."""
  model = model_lib.build_model(config.model, precision.get_policy(config.precision.policy))
  tx, schedule = train.make_optimizer(config)
  init = jax.jit(lambda rng: nn.unbox(train.make_init_fn(config, model, tx)(rng)))
  return model, tx, schedule, init(jax.random.PRNGKey(0))


def smoke_batch(config, step):
  ds = data_lib.make_dataset(config.data, config.seed, config.model.vocab_size)
  return jnp.asarray(ds.train_batch(step))


class OptimizerTest(parameterized.TestCase):

  def test_float32_moments_give_optax_adamw_exactly(self):
    config = smoke_config()
    config.optim.grad_clip = 0.0  # optax.adamw has no clipping
    tx, schedule = train.make_optimizer(config)
    optim = config.optim
    ref = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                      weight_decay=optim.weight_decay, mask=train.weight_decay_mask)
    params = {'w': jax.random.normal(jax.random.PRNGKey(7), (3, 4)), 'b': jnp.zeros((4,)),
              'embedding': jnp.ones((5, 4))}
    ours_state, ref_state = tx.init(params), ref.init(params)
    ours_update, ref_update = jax.jit(tx.update), jax.jit(ref.update)
    for i in range(6):
      grads = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(i), p.shape), params)
      ours, ours_state = ours_update(grads, ours_state, params)
      want, ref_state = ref_update(grads, ref_state, params)
      chex.assert_trees_all_equal(ours, want)
      params = optax.apply_updates(params, ours)
    chex.assert_trees_all_equal(ours_state[1].nu, ref_state[0].nu)
    chex.assert_trees_all_equal(ours_state[1].mu, ref_state[0].mu)

  @parameterized.parameters(
      ('fp32', jnp.float32, jnp.float32),
      ('bf16', jnp.bfloat16, jnp.float32),
      ('pure_bf16', jnp.bfloat16, jnp.bfloat16),
      ('pure_bf16', jnp.bfloat16, jnp.float32, '', 'float32'),
      ('fp32', jnp.bfloat16, jnp.float32, 'bfloat16', ''),
  )
  def test_moment_dtypes_follow_the_policy(self, policy, mu_dtype, nu_dtype, mu_override='',
                                           nu_override=''):
    config = smoke_config()
    config.precision.update(policy=policy, mu_dtype=mu_override, nu_dtype=nu_override)
    model = model_lib.build_model(config.model, precision.get_policy(policy))
    tx, _ = train.make_optimizer(config)
    state = nn.unbox(jax.eval_shape(train.make_init_fn(config, model, tx), jax.random.PRNGKey(0)))
    adam = state.opt_state[1]
    self.assertIsInstance(adam, optax.ScaleByAdamState)
    self.assertEqual({x.dtype for x in jax.tree.leaves(adam.mu)}, {jnp.dtype(mu_dtype)})
    self.assertEqual({x.dtype for x in jax.tree.leaves(adam.nu)}, {jnp.dtype(nu_dtype)})

  def test_pure_bf16_step_keeps_bf16_params_and_moments(self):
    config = smoke_config()
    config.precision.policy = 'pure_bf16'
    model = model_lib.build_model(config.model, precision.get_policy('pure_bf16'))
    tx, schedule = train.make_optimizer(config)
    state = nn.unbox(jax.eval_shape(train.make_init_fn(config, model, tx), jax.random.PRNGKey(0)))
    batch = jax.ShapeDtypeStruct((8, 33), jnp.int32)
    state, metrics = jax.eval_shape(train.make_train_step(model, tx, schedule), state, batch)
    self.assertEqual(metrics['loss'].dtype, jnp.float32)
    self.assertEqual({x.dtype for x in jax.tree.leaves(state.params)}, {jnp.dtype(jnp.bfloat16)})
    adam = state.opt_state[1]
    self.assertEqual({x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))},
                     {jnp.dtype(jnp.bfloat16)})

  def test_weight_decay_mask(self):
    config = smoke_config()
    model = model_lib.build_model(config.model, precision.get_policy('fp32'))
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)['params']
    mask = train.weight_decay_mask(params)
    self.assertEqual(mask, train.weight_decay_mask(nn.unbox(params)))
    self.assertFalse(mask['embedding'])
    self.assertFalse(mask['final_norm']['scale'])
    self.assertFalse(mask['layer_0']['attn_norm']['scale'])
    self.assertTrue(mask['logits'])
    self.assertTrue(mask['layer_0']['attn']['query'])
    self.assertTrue(mask['layer_1']['ffn']['experts']['wi_0'])
    self.assertTrue(mask['layer_1']['ffn']['router']['kernel'])

  def test_weight_decay_mask_ignores_a_leading_member_axis(self):
    config = smoke_config()
    model = model_lib.build_model(config.model, precision.get_policy('fp32'))
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)['params'])
    members = jax.tree.map(lambda p: jax.ShapeDtypeStruct((3, *p.shape), p.dtype), params)
    self.assertEqual(members['final_norm']['scale'].shape, (3, config.model.d_model))
    self.assertEqual(train.weight_decay_mask(members), train.weight_decay_mask(params))

  def test_learning_rate_schedule(self):
    config = smoke_config(num_steps=20)
    config.optim.update(learning_rate=1e-2, warmup_steps=4, end_lr_ratio=0.1)
    schedule = train.learning_rate_schedule(config)
    np.testing.assert_allclose(
        [schedule(0), schedule(2), schedule(4), schedule(12), schedule(20)],
        [0.0, 5e-3, 1e-2, 5.5e-3, 1e-3], rtol=1e-5, atol=1e-9)

  @parameterized.parameters(
      ('train.num_steps', 0), ('train.log_every', 0), ('optim.learning_rate', -1.0),
      ('optim.warmup_steps', 20), ('optim.end_lr_ratio', 2.0), ('optim.b2', 1.0),
      ('data.seq_len', 64), ('precision.policy', 'fp8'), ('precision.mu_dtype', 'int8'))
  def test_bad_values_fail_naming_the_field(self, field, value):
    config = smoke_config()
    section, key = field.split('.')
    config[section][key] = value
    with self.assertRaisesRegex(ValueError, field.replace('.', r'\.')):
      train.validate_config(config)


class TrainStepTest(parameterized.TestCase):

  def test_traces_once_skips_nonfinite_steps_and_adjusts_the_loss_scale(self):
    config = smoke_config()
    model, tx, schedule, state = single_device_state(config)
    # fp16's dynamic loss scale on an fp32 model: the skip logic is the same, and CPUs lack fp16
    # matmuls with float32 accumulation.
    state = state.replace(loss_scale=precision.loss_scale_for('fp16', 2.0**15, period=2000))
    step_fn = jax.jit(chex.assert_max_traces(train.make_train_step(model, tx, schedule), n=1),
                      donate_argnums=0)
    batch = smoke_batch(config, 0)
    state, metrics = step_fn(state, batch)
    self.assertTrue(np.isfinite(metrics['loss']))
    self.assertEqual(int(metrics['skipped']), 0)
    self.assertEqual(float(state.loss_scale.scale), 2.0**15)

    good = jax.device_get(state)
    poisoned = state.replace(params={**state.params,
                                     'logits': jnp.full_like(state.params['logits'], jnp.nan)})
    before = jax.device_get(poisoned)
    state, metrics = step_fn(poisoned, batch)
    self.assertEqual(int(metrics['skipped']), 1)
    self.assertEqual(int(state.nonfinite_count), 1)
    self.assertEqual(int(state.step), 2)
    self.assertEqual(float(state.loss_scale.scale), 2.0**14)
    chex.assert_trees_all_equal(jax.device_get(state.params), before.params)
    chex.assert_trees_all_equal(jax.device_get(state.opt_state), before.opt_state)

    state, metrics = step_fn(state, batch)
    self.assertEqual(int(state.nonfinite_count), 2)
    # Step 3 after a skipped step 2: the optimizer has applied one update, so its rate is that of
    # schedule step 1 (still in warmup, unlike step 2).
    self.assertNotEqual(float(schedule(1)), float(schedule(2)))
    self.assertAlmostEqual(float(metrics['learning_rate']), float(schedule(1)))

    recovered = jax.tree.map(jnp.asarray, good).replace(nonfinite_count=jnp.array(2, jnp.int32))
    state, metrics = step_fn(recovered, batch)
    self.assertEqual(int(metrics['skipped']), 0)
    self.assertEqual(int(state.nonfinite_count), 0)
    self.assertFalse(np.array_equal(state.params['logits'], good.params['logits']))


  def test_objective_is_pluggable_and_eval_reports_its_loss(self):
    config = smoke_config()
    model, tx, schedule, state = single_device_state(config)
    batch = smoke_batch(config, 0)

    def doubled(output, batch):
      loss, metrics = objective_lib.lm_objective(output, batch)
      return 2.0 * loss, dict(metrics, doubled_loss=2.0 * loss)

    _, default = jax.jit(train.make_train_step(model, tx, schedule))(state, batch)
    _, custom = jax.jit(train.make_train_step(model, tx, schedule, objective=doubled))(state, batch)
    self.assertAlmostEqual(float(custom['grad_norm']), 2 * float(default['grad_norm']), places=4)
    self.assertAlmostEqual(float(custom['doubled_loss']),
                           2 * float(default['loss'] + default['aux_loss']), places=5)
    self.assertEqual(float(custom['loss']), float(default['loss']))

    eval_metrics = jax.jit(train.make_eval_step(model, objective=doubled))(state, batch)
    logits, _ = model.apply({'params': state.params}, batch[:, :-1])
    self.assertAlmostEqual(float(eval_metrics['loss']),
                           float(objective_lib.cross_entropy(logits, batch[:, 1:])), places=5)


class _PoisonedSteps:
  """Wraps a Dataset; the train batches of `bad` (0-based batch indices, so steps index + 1) hold
  an out-of-vocabulary token, whose embedding lookup gives NaN (jnp.take fills out-of-bounds rows
  with NaN)."""

  def __init__(self, ds, bad):
    self._ds, self._bad = ds, bad

  def __getattr__(self, name):
    return getattr(self._ds, name)

  def train_batch(self, step, process_index=0, process_count=1):
    batch = self._ds.train_batch(step, process_index, process_count)
    if step in self._bad:
      batch = batch.copy()
      batch[:, 0] = data_lib.VOCAB_SIZE
    return batch


def poison(monkeypatch, bad):
  """Makes the train loop's datasets poison the train batches of `bad` (see _PoisonedSteps)."""
  make_dataset = data_lib.make_dataset
  monkeypatch.setattr(train.data_lib, 'make_dataset',
                      lambda *args: _PoisonedSteps(make_dataset(*args), bad))


def test_nonfinite_steps_in_a_row_stop_the_run_naming_the_step(tmp_path, monkeypatch):
  poison(monkeypatch, bad=range(3, 100))  # from step 4 on
  config = smoke_config(num_steps=10, log_every=1, eval_every=100, checkpoint_every=100,
                        max_nonfinite_steps=2)
  with pytest.raises(FloatingPointError, match=r'at step 5 \(train.max_nonfinite_steps=2\)'):
    train.train_and_evaluate(config, str(tmp_path))
  lines = {line['step']: line for line in read_lines(str(tmp_path)) if 'loss' in line}
  assert lines[3]['skipped'] == 0 and np.isfinite(lines[3]['loss'])
  assert lines[4]['skipped'] == 1 and lines[4]['skipped_steps'] == 1


@pytest.mark.slow
def test_resume_is_bitwise_identical_and_evaluate_reproduces_the_eval_loss(tmp_path):
  config = smoke_config(num_steps=12, log_every=2, eval_every=6, checkpoint_every=4,
                        keep_checkpoints=3, peak_flops=1e12)
  full, resumed = str(tmp_path / 'full'), str(tmp_path / 'resumed')
  final = train.train_and_evaluate(config, full)
  assert final['step'] == 12

  lines = read_lines(full)
  train_lines = [line for line in lines if 'loss' in line]
  eval_lines = [line for line in lines if 'eval_loss' in line]
  assert [line['step'] for line in train_lines] == [2, 4, 6, 8, 10, 12]
  assert [line['step'] for line in eval_lines] == [6, 12]
  assert len(train_lines[-1]['expert_fraction']) == 2  # per MoE layer
  assert final['eval_loss'] == eval_lines[-1]['eval_loss']
  assert final['eval_bits_per_byte'] == pytest.approx(final['eval_loss'] / np.log(2))
  assert os.path.exists(os.path.join(full, 'metrics.png'))
  # Model FLOPs and MFU against the configured peak (per device, times the device count).
  tokens = config.data.batch_size * config.data.seq_len
  flops = model_lib.flops_per_token(config.model, config.data.seq_len) * tokens
  for line in train_lines:
    assert line['flops_per_step'] == pytest.approx(flops)
    assert line['mfu'] == pytest.approx(flops / line['step_time'] / (1e12 * jax.device_count()))

  # A run that stopped after its step-4 checkpoint (and logged a little past it) resumes there.
  shutil.copytree(full, resumed)
  for step in ('8', '12'):
    shutil.rmtree(os.path.join(resumed, 'checkpoints', step))
  assert train.train_and_evaluate(config, resumed)['step'] == 12
  assert without_timing(read_lines(resumed)) == without_timing(lines)
  _, full_params, _ = workdir_lib.restore_params(full)
  _, resumed_params, _ = workdir_lib.restore_params(resumed)
  chex.assert_trees_all_equal(resumed_params, full_params)

  evaluated = train.evaluate(workdir_lib.load_config(full), full)
  assert evaluated['step'] == 12
  assert evaluated['eval_loss'] == pytest.approx(eval_lines[-1]['eval_loss'], rel=1e-6)

  config.model.d_model = 64
  with pytest.raises(ValueError, match=r'model\.d_model: 32 -> 64'):
    train.train_and_evaluate(config, full)


@pytest.mark.slow
def test_pure_bf16_with_stochastic_rounding_resumes_bitwise(tmp_path):
  config = smoke_config(num_steps=8, log_every=2, eval_every=8, checkpoint_every=4)
  config.precision.update(policy='pure_bf16', stochastic_rounding=True)
  full, resumed, nearest = (str(tmp_path / name) for name in ('full', 'resumed', 'nearest'))
  train.train_and_evaluate(config, full)
  shutil.copytree(full, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '8'))
  train.train_and_evaluate(config, resumed)
  assert without_timing(read_lines(resumed)) == without_timing(read_lines(full))
  _, full_params, _ = workdir_lib.restore_params(full)
  _, resumed_params, _ = workdir_lib.restore_params(resumed)
  chex.assert_trees_all_equal(resumed_params, full_params)
  assert {x.dtype for x in jax.tree.leaves(full_params)} == {jnp.dtype(jnp.bfloat16)}
  # The rounding is real: nearest rounding ends elsewhere.
  config.precision.stochastic_rounding = False
  train.train_and_evaluate(config, nearest)
  _, nearest_params, _ = workdir_lib.restore_params(nearest)
  assert any(not np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
             for a, b in zip(jax.tree.leaves(full_params), jax.tree.leaves(nearest_params)))


def test_restore_params_returns_the_checkpoints_params_and_router_state(tmp_path):
  config = smoke_config(num_steps=2, log_every=2, eval_every=2, checkpoint_every=2)
  config.model.moe.router = 'aux_free'
  config.optim.warmup_steps = 1
  workdir = str(tmp_path / 'aux_free')
  train.train_and_evaluate(config, workdir)
  restored_config, params, router_state = workdir_lib.restore_params(workdir)
  assert restored_config.model.moe.router == 'aux_free'
  # The bias moved during training, so a fresh init would not match.
  _, _, _, fresh = single_device_state(config)
  assert jax.tree.leaves(router_state) and not all(
      np.array_equal(a, b) for a, b in zip(jax.tree.leaves(router_state),
                                           jax.tree.leaves(fresh.router_state)))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)
  full = ckpt.restore(2, fresh)
  ckpt.close()
  chex.assert_trees_all_equal(params, full.params)
  chex.assert_trees_all_equal(router_state, full.router_state)


def _committed_steps(workdir):
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit() and os.path.exists(os.path.join(directory, name,
                                                                  'commit_success.txt')))


def _train_steps(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith('\n') and '"loss"' in line]


def _wait_for(predicate, process, timeout=120.0):
  deadline = time.monotonic() + timeout
  while not predicate():
    if process.poll() is not None:
      raise AssertionError(f'train.py exited early with {process.returncode}: '
                           f'{process.stderr.read().decode()[-3000:]}')
    if time.monotonic() > deadline:
      process.kill()
      raise AssertionError('timed out waiting for train.py')
    time.sleep(0.05)


def smoke_config_flag(name):
  """--config= experiments/configs/`name`.py's smoke variant."""
  return '--config=' + os.path.join(REPO, 'experiments', 'configs', name + '.py') + ':smoke'


def train_command(workdir, *flags):
  """experiments/train.py on `workdir` with `flags`."""
  return [sys.executable, os.path.join(REPO, 'experiments', 'train.py'), f'--workdir={workdir}',
          *flags]


def subprocess_env():
  """The environment of a train.py subprocess on CPU: cheaper XLA codegen, and the test run's
  compilation cache (conftest.py), inherited from os.environ."""
  return {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu',
          'XLA_FLAGS': '--xla_backend_optimization_level=0'}


def logged_past(workdir, step):
  """Whether `workdir`'s train lines have reached `step` (a predicate for _wait_for)."""
  return lambda: bool(_train_steps(workdir)) and _train_steps(workdir)[-1]['step'] >= step


def kill_and_resume(command, env, workdir, timeout=120.0):
  """Runs `command` until it logs a step past a committed checkpoint, kills it (SIGKILL), then runs
  it again until it logs two steps past the killed run's last: (the killed run's train lines, the
  second process, still running)."""
  first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  def logged_past_a_checkpoint():
    steps, lines = _committed_steps(workdir), _train_steps(workdir)
    return steps and lines and lines[-1]['step'] > steps[-1]
  _wait_for(logged_past_a_checkpoint, first, timeout)
  first.kill()
  first.wait()
  killed_lines = _train_steps(workdir)
  assert killed_lines[-1]['step'] > _committed_steps(workdir)[-1]
  second = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  _wait_for(logged_past(workdir, killed_lines[-1]['step'] + 2), second, timeout)
  return killed_lines, second


def assert_killed_steps_redone(workdir, killed_lines):
  """Every logged step is there once, and the killed run's are redone identically (same data, same
  state); the logged steps."""
  lines = _train_steps(workdir)
  steps = [line['step'] for line in lines]
  assert steps == list(range(2, steps[-1] + 1, 2))  # nothing missing, nothing twice
  assert without_timing(lines[:len(killed_lines)]) == without_timing(killed_lines)
  return steps


@pytest.mark.slow
def test_sigkill_loses_only_steps_after_the_checkpoint_and_sigterm_exits_cleanly(tmp_path):
  workdir = str(tmp_path / 'run')
  command = train_command(workdir, smoke_config_flag('moe_tiny'), '--config.train.num_steps=100000',
                          '--config.train.log_every=2', '--config.train.checkpoint_every=6',
                          '--config.train.eval_every=100000')
  killed_lines, second = kill_and_resume(command, subprocess_env(), workdir)
  second.send_signal(signal.SIGTERM)
  assert second.wait(timeout=60) == 0, second.stderr.read().decode()[-3000:]
  steps = assert_killed_steps_redone(workdir, killed_lines)
  assert _committed_steps(workdir)[-1] >= steps[-1]


def test_init_from_starts_from_the_other_workdirs_params_with_a_fresh_optimizer(tmp_path):
  source, started = str(tmp_path / 'source'), str(tmp_path / 'started')
  config = smoke_config(num_steps=2, log_every=2, eval_every=2, checkpoint_every=2)
  config.optim.warmup_steps = 1
  train.train_and_evaluate(config, source)
  config = smoke_config(num_steps=1, log_every=1, eval_every=1, checkpoint_every=1,
                        init_from=source)
  config.optim.update(warmup_steps=0, learning_rate=1e-9)  # one step that barely moves
  train.train_and_evaluate(config, started)
  _, source_params, _ = workdir_lib.restore_params(source)
  _, started_params, _ = workdir_lib.restore_params(started)
  chex.assert_trees_all_close(started_params, source_params, atol=1e-6)
  ckpt = checkpoint.Checkpointer(os.path.join(started, 'checkpoints'), read_only=True)
  step, state = ckpt.restore_latest(single_device_state(config)[3])
  ckpt.close()
  assert step == 1 and int(state.opt_state[1].count) == 1  # its own optimizer and steps
  config.model.d_model = 64
  with pytest.raises(ValueError, match=r"train.init_from=.*\['embedding'\] has shape"):
    train.train_and_evaluate(config, str(tmp_path / 'wider'))


def test_distill_from_logs_the_kl_to_the_teacher_and_evaluates_the_data_loss(tmp_path):
  teacher = str(tmp_path / 'teacher')
  config = smoke_config(num_steps=2, log_every=2, eval_every=2, checkpoint_every=2)
  config.optim.warmup_steps = 1
  train.train_and_evaluate(config, teacher)
  config = smoke_config(num_steps=2, log_every=1, eval_every=2, checkpoint_every=2,
                        distill_from=teacher, distill_weight=0.5)
  config.optim.warmup_steps = 1
  config.seed = 1
  result = train.train_and_evaluate(config, str(tmp_path / 'student'))
  lines = [line for line in read_lines(str(tmp_path / 'student')) if 'distill_kl' in line]
  assert len(lines) == 2 and all(line['distill_kl'] > 0 for line in lines)
  assert np.isfinite(result['eval_loss'])


def test_an_ensemble_teacher_gives_its_fused_distribution(tmp_path):
  teacher = str(tmp_path / 'teacher')
  config = config_files.get_config('ensemble_tiny:smoke')  # 2 members, fused by mean_prob
  config.train.update(num_steps=2, log_every=2, eval_every=2, checkpoint_every=2)
  config.optim.warmup_steps = 1
  train.train_and_evaluate(config, teacher)
  student = smoke_config(num_steps=1, log_every=1, eval_every=1, checkpoint_every=1,
                         distill_from=teacher)
  student.optim.warmup_steps = 0
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)
  target = train.teacher_log_probs_fn(student, sharding.make_mesh(student.mesh, jax.devices()[:1]))
  _, members, num_members, _ = evaluation.load_members([teacher])
  lp, _ = members(tokens)
  assert num_members == 2 and lp.shape[:2] == (2, 2)
  np.testing.assert_allclose(target(tokens), ensemble.mean_prob(lp), atol=1e-6)
  assert float(jnp.max(jnp.abs(target(tokens) - lp[0]))) > 1e-3  # not just one member
  train.train_and_evaluate(student, str(tmp_path / 'student'))
  (line,) = [line for line in read_lines(str(tmp_path / 'student')) if 'distill_kl' in line]
  assert line['distill_kl'] > 0
