"""The train loop under faults (issue 10): non-finite updates, halts and their recovery, fp16 loss
scales, skip counters across resume, Ctrl-C, failed saves, resuming from --workdir alone.

Each test first reproduces its fault on the moe_tiny smoke config, then checks what moejax does.
"""
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from moejax import precision
from moejax import train
from moejax import workdir as workdir_lib
from test_train import _committed_steps
from test_train import _train_steps
from test_train import _wait_for
from test_train import logged_past
from test_train import poison
from test_train import read_lines
from test_train import smoke_config
from test_train import smoke_config_flag
from test_train import subprocess_env
from test_train import train_command


def train_lines(workdir):
  return {line['step']: line for line in read_lines(workdir) if 'loss' in line}


def restored_params(workdir):
  return workdir_lib.restore_params(workdir)[1]


@pytest.mark.slow
def test_an_update_that_would_make_weights_nonfinite_is_skipped_never_saved_and_recoverable(
    tmp_path):
  workdir = str(tmp_path / 'run')
  # lr 1e39 is inf in float32: the gradients are finite, every update is not.
  config = smoke_config(num_steps=8, log_every=1, eval_every=100, checkpoint_every=1,
                        max_nonfinite_steps=3)
  config.optim.learning_rate = 1e39
  with pytest.raises(FloatingPointError) as halted:
    train.train_and_evaluate(config, workdir)
  message = str(halted.value)
  assert 'steps 1 to 3' in message and 'gradients were finite but its update was not' in message
  assert 'lower optim.learning_rate' in message and 'no checkpoint was saved' in message
  lines = train_lines(workdir)
  assert [lines[s]['skipped'] for s in (1, 2, 3)] == [1, 1, 1]
  assert all(np.isfinite(lines[s]['loss']) and np.isfinite(lines[s]['grad_norm']) for s in lines)
  assert _committed_steps(workdir) == []  # no save while steps are skipped

  config.optim.learning_rate = 3e-3  # resume as the message advises: trains on
  final = train.train_and_evaluate(config, workdir)
  assert final['step'] == 8 and final['skipped_steps'] == 0 and np.isfinite(final['loss'])
  assert precision.all_finite(restored_params(workdir))


@pytest.mark.slow
def test_after_a_halt_with_nan_gradients_a_lower_rate_trains_on(tmp_path):
  # lr 1e6: step 2's update leaves huge finite weights whose gradients are NaN from step 3 on.
  workdir = str(tmp_path / 'run')
  config = smoke_config(num_steps=8, log_every=1, eval_every=100, checkpoint_every=4,
                        max_nonfinite_steps=3)
  config.optim.learning_rate = 1e6
  with pytest.raises(FloatingPointError, match='steps 3 to 5.*gradients were not finite.*no '
                                               'checkpoint was saved'):
    train.train_and_evaluate(config, workdir)
  assert _committed_steps(workdir) == []
  config.optim.learning_rate = 3e-3
  final = train.train_and_evaluate(config, workdir)
  assert final['step'] == 8 and np.isfinite(final['loss'])
  assert not any(line['skipped'] for line in train_lines(workdir).values())


@pytest.mark.slow
def test_skipped_steps_is_a_running_total_across_resume_and_the_count_restarts(tmp_path,
                                                                               monkeypatch):
  poison(monkeypatch, bad={2, 3, 6})  # steps 3, 4 and 7
  workdir = str(tmp_path / 'run')
  config = smoke_config(num_steps=6, log_every=1, eval_every=100, checkpoint_every=6,
                        max_nonfinite_steps=5)
  train.train_and_evaluate(config, workdir)
  assert train_lines(workdir)[6]['skipped_steps'] == 2
  config.train.num_steps = 8
  assert train.train_and_evaluate(config, workdir)['skipped_steps'] == 3
  assert [train_lines(workdir)[s]['skipped_steps'] for s in (6, 7, 8)] == [2, 3, 3]


@pytest.mark.slow
def test_fp16_does_not_halt_while_the_loss_scale_falls(tmp_path):
  # loss_scale_init 1e12 overflows for more than max_nonfinite_steps (20) steps in a row while
  # the scale halves towards a value that fits; the run must go on, not halt at step 20.
  workdir = str(tmp_path / 'run')
  config = smoke_config(num_steps=40, log_every=1, eval_every=100, checkpoint_every=100)
  config.precision.update(policy='fp16', loss_scale_init=1e12)
  final = train.train_and_evaluate(config, workdir)
  lines = train_lines(workdir)
  streak = next(s for s in sorted(lines) if not lines[s]['skipped']) - 1
  assert streak >= config.train.max_nonfinite_steps  # the old halt fired at this count
  assert final['step'] == 40 and not lines[40]['skipped']
  assert lines[streak]['loss_scale'] == pytest.approx(1e12 / 2**(streak - 1))


@pytest.mark.slow
def test_fp16_halt_names_the_loss_scale_and_its_floor(tmp_path, monkeypatch):
  poison(monkeypatch, bad=set(range(2, 100)))  # from step 3 on
  config = smoke_config(num_steps=20, log_every=1, eval_every=100, checkpoint_every=100,
                        max_nonfinite_steps=3)
  config.precision.update(policy='fp16', loss_scale_init=8.0)
  # 8 -> 4 -> 2 -> 1: the halt waits for the floor, then fires three steps into the streak at it.
  with pytest.raises(FloatingPointError, match=r'steps 3 to 6.*loss scale at its floor 1 \(down '
                                               r'from precision.loss_scale_init=8'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


def _with_file_size_limit(kilobytes, command):
  """`command` with writes past `kilobytes` per file failing with EFBIG (SIGXFSZ ignored)."""
  return ['bash', '-c', f'ulimit -f {kilobytes} && trap "" XFSZ && exec "$@"', '_', *command]


@pytest.mark.slow
def test_ctrl_c_workdir_alone_and_a_failed_save(tmp_path):
  workdir, env = str(tmp_path / 'run'), subprocess_env()
  config_flags = [smoke_config_flag('moe_tiny'), '--config.model.d_model=16',
                  '--config.train.num_steps=100000', '--config.train.log_every=2',
                  '--config.train.checkpoint_every=1000', '--config.train.eval_every=100000']

  # Ctrl-C saves at the step reached and exits 0, like SIGTERM.
  first = subprocess.Popen(train_command(workdir, *config_flags), env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  _wait_for(logged_past(workdir, 4), first, timeout=400)
  first.send_signal(signal.SIGINT)
  assert first.wait(timeout=60) == 0, first.stderr.read().decode()[-3000:]
  stopped_at = _committed_steps(workdir)[-1]
  assert stopped_at >= _train_steps(workdir)[-1]['step'] >= 4

  # --workdir alone resumes the run's own config (d_model 16: the default config would not fit);
  # a second Ctrl-C ends the process at once.
  second = subprocess.Popen(train_command(workdir), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
  _wait_for(logged_past(workdir, stopped_at + 4), second, timeout=400)
  second.send_signal(signal.SIGINT)
  time.sleep(0.3)  # two signals before Python's handler runs would count as one
  second.send_signal(signal.SIGINT)
  assert second.wait(timeout=10) == -signal.SIGINT
  assert workdir_lib.load_config(workdir).model.d_model == 16

  # A save that cannot be written (files limited to 64 kB: the checkpoint's array files are
  # larger) stops the run at that step with one line naming the step directory and the error.
  before = _committed_steps(workdir)
  third = subprocess.run(
      _with_file_size_limit(64, train_command(workdir, '--config.train.checkpoint_every=2')),
      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
  stderr = third.stderr.decode()
  assert third.returncode == 1, stderr[-3000:]
  failed_step = (before[-1] // 2 + 1) * 2
  message = (f'train.py: SaveError: saving step {failed_step} to '
             f'{os.path.join(workdir, "checkpoints", str(failed_step))} failed')
  # Searched among the lines, not read off the last one: as the process exits, orbax's asyncio
  # threads may print their own tracebacks around it (before it without a newline, or after it).
  lines = [line for line in stderr.splitlines() if message in line]
  assert len(lines) == 1, stderr[-3000:]
  assert 'File too large' in lines[0]
  assert _committed_steps(workdir) == before  # the earlier checkpoints are intact
  assert train.evaluate(workdir_lib.load_config(workdir), workdir)['step'] == before[-1]
