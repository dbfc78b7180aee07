"""Tests for moejax/workdir.py: validate before writing, config/checkpoint compatibility, the
one-trainer lock, resuming a workdir's own config, and the lock-free readers.

Each test first reproduces its fault of issue 10 on a copy of one trained smoke workdir (steps 2
and 4 checkpointed).
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from moejax import train
from moejax import workdir as workdir_lib
from test_train import REPO
from test_train import smoke_config


def small_config(**train_overrides):
  return smoke_config(**{**dict(num_steps=4, log_every=2, eval_every=2, checkpoint_every=2),
                         **train_overrides})


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('trained') / 'run')
  train.train_and_evaluate(small_config(), workdir)
  return workdir


@pytest.fixture
def run(trained, tmp_path):
  copy = str(tmp_path / 'run')
  shutil.copytree(trained, copy)
  return copy


def snapshot(workdir):
  """{relative path: bytes} of every file under `workdir`."""
  files = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        files[os.path.relpath(path, workdir)] = f.read()
  return files


def test_a_rejected_fresh_run_writes_nothing(tmp_path):
  workdir = str(tmp_path / 'fresh')
  config = small_config()
  config.model.moe.router = 'topk'
  with pytest.raises(ValueError, match='router'):
    train.train_and_evaluate(config, workdir)
  config = small_config()
  config.data.update(corpus='text', paths='/nonexistent/*.txt')
  with pytest.raises(ValueError, match='matches no file'):
    train.train_and_evaluate(config, workdir)
  assert not os.path.exists(workdir)


@pytest.mark.parametrize('change, message', [
    (dict(section='data', corpus='text', paths='/nonexistent/*.txt'), 'matches no file'),
    (dict(section='moe', num_experts=0), 'num_experts'),
    (dict(section='precision', policy='fp16'),
     r"precision.policy: 'fp32' -> 'fp16'.*loss_scale\.\w+ \[\] \w+ is not in the checkpoint"),
    (dict(section='model', d_model=64),
     r'model.d_model: 32 -> 64.*params\.\S+ is \[\d+, 32\] float32 in the checkpoint, \[\d+, 64\]'),
])
def test_a_rejected_resume_leaves_every_file_byte_identical(run, change, message):
  before = snapshot(run)
  config = small_config(num_steps=6)
  section = change.pop('section')
  (config.model.moe if section == 'moe' else config[section]).update(change)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, run)
  assert snapshot(run) == before
  # The readers still work on the untouched workdir.
  assert train.evaluate(workdir_lib.load_config(run), run)['step'] == 4


def test_incompatible_change_is_one_line(run):
  config = small_config()
  config.model.moe.num_experts = 8
  with pytest.raises(workdir_lib.IncompatibleWorkdir) as raised:
    train.train_and_evaluate(config, run)
  message = str(raised.value)
  assert '\n' not in message
  assert 'model.moe.num_experts: 4 -> 8' in message
  assert 'step-4 checkpoint' in message and 'wi_0 is [4, 32, 32] float32 in the checkpoint' in message


def test_a_compatible_change_is_allowed_and_recorded(run):
  config = small_config(num_steps=6, eval_every=3)
  config.optim.learning_rate = 1e-3
  assert train.train_and_evaluate(config, run)['step'] == 6
  assert workdir_lib.load_config(run).optim.learning_rate == 1e-3
  with open(os.path.join(run, workdir_lib.CONFIG_CHANGES_FILE)) as f:
    (line,) = [json.loads(line) for line in f]
  assert line == {'step': 4, 'changes': {'optim.learning_rate': [3e-3, 1e-3],
                                         'train.eval_every': [2, 3], 'train.num_steps': [4, 6]}}


def test_resumed_config_is_the_runs_own_with_overrides_on_top(run):
  config = workdir_lib.resumed_config(run, {'train.num_steps': 9, 'optim.learning_rate': 1e-3})
  assert config.model.d_model == 32 and config.train.num_steps == 9
  assert config.optim.learning_rate == 1e-3
  assert config.mesh.rules == small_config().mesh.rules
  with pytest.raises(KeyError, match='Did you mean "learning_rate"'):
    workdir_lib.resumed_config(run, {'optim.learning_rat': 1e-3})


def _hold_lock(workdir):
  """A process holding `workdir`'s lock the way a trainer does; prints its pid once it holds it."""
  code = ('import sys, time; from moejax import workdir; lock = workdir.WorkdirLock(sys.argv[1]); '
          'lock.record_holder(); print("held", flush=True); time.sleep(600)')
  holder = subprocess.Popen([sys.executable, '-c', code, workdir], stdout=subprocess.PIPE,
                            env={**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'})
  assert holder.stdout.readline() == b'held\n'
  return holder


def test_a_second_trainer_fails_at_once_naming_the_holder_and_kill_9_frees_the_lock(run):
  holder = _hold_lock(run)
  try:
    before = snapshot(run)
    with pytest.raises(workdir_lib.WorkdirInUse,
                       match=f'in use by pid {holder.pid} on host {socket.gethostname()}'):
      train.train_and_evaluate(small_config(num_steps=6), run)
    assert snapshot(run) == before
    # Readers take no lock.
    assert train.evaluate(workdir_lib.load_config(run), run)['step'] == 4
    assert workdir_lib.restore_params(run)[1]
  finally:
    holder.kill()
    holder.wait()
  lock = workdir_lib.WorkdirLock(run)  # a killed holder leaves no stale lock
  lock.release()


def _truncate_arrays(step_dir):
  for root, _, names in os.walk(os.path.join(step_dir, 'state')):
    for name in names:
      path = os.path.join(root, name)
      if os.sep + 'd' + os.sep in path + os.sep and os.path.getsize(path) > 16:
        with open(path, 'r+b') as f:
          f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize('damage', ['truncated arrays', 'no _METADATA'])
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(run, damage, caplog):
  newest = os.path.join(run, 'checkpoints', '4')
  if damage == 'truncated arrays':
    _truncate_arrays(newest)
  else:
    os.remove(os.path.join(newest, 'state', '_METADATA'))
  assert train.evaluate(workdir_lib.load_config(run), run)['step'] == 2
  assert 'Skipping the checkpoint at' in caplog.text and '/checkpoints/4' in caplog.text
  assert os.path.isdir(newest)  # nothing deleted
  assert workdir_lib.restore_params(run)[1]
  assert train.train_and_evaluate(small_config(num_steps=6), run)['step'] == 6


def test_no_restorable_checkpoint_fails_naming_the_directory(run):
  for step in ('2', '4'):
    os.remove(os.path.join(run, 'checkpoints', step, 'state', '_METADATA'))
  with pytest.raises(ValueError, match=f'no checkpoint in {os.path.join(run, "checkpoints")} '
                                       r'restores completely \(step 4: .*; step 2: '):
    train.train_and_evaluate(small_config(num_steps=6), run)


def test_a_config_recorded_before_fit_batches_loads_with_the_current_keys(tmp_path):
  recorded = json.loads(small_config().to_json_best_effort())
  fit_batches = recorded['ensemble'].pop('fit_batches')
  recorded['ensemble'].update(holdout_fraction=0.02, holdout_batches=fit_batches)
  (tmp_path / workdir_lib.CONFIG_FILE).write_text(json.dumps(recorded))
  config = workdir_lib.load_config(str(tmp_path))
  assert json.loads(config.to_json_best_effort()) == json.loads(small_config().to_json_best_effort())
