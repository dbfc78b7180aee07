"""Tests for moejax/metrics.py: JSONL + TensorBoard writer, truncation, progress line, peak FLOP/s, plot."""
import glob
import json
import os
import struct
import subprocess
import sys
import time
import types

import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from moejax import metrics


def read_jsonl(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def read_tensorboard(workdir):
  """{(tag, step): value} of every scalar in the event files of `workdir` (TFRecord framing)."""
  scalars = {}
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    with open(path, 'rb') as f:
      blob = f.read()
    offset = 0
    while offset < len(blob):
      (length,) = struct.unpack('<Q', blob[offset:offset + 8])
      event = event_pb2.Event.FromString(blob[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars[(value.tag, event.step)] = value.simple_value
  return scalars


def test_write_jsonl_and_tensorboard(tmp_path):
  writer = metrics.MetricWriter(tmp_path)
  fraction = np.array([[0.5, 0.25, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25]], np.float32)
  writer.write(10, {'loss': jnp.float32(2.5), 'tokens': 512, 'expert_fraction': jnp.asarray(fraction),
                    'member_loss': [1.0, 2.0]})
  writer.write(20, {'eval_loss': 2.25})
  writer.flush()
  lines = read_jsonl(tmp_path)
  assert lines == [
      {'step': 10, 'loss': 2.5, 'tokens': 512.0, 'expert_fraction': fraction.tolist(), 'member_loss': [1.0, 2.0]},
      {'step': 20, 'eval_loss': 2.25},
  ]
  assert isinstance(lines[0]['tokens'], float)
  writer.close()
  scalars = read_tensorboard(tmp_path)
  assert scalars[('loss', 10)] == 2.5
  assert scalars[('eval_loss', 20)] == 2.25
  assert scalars[('expert_fraction/layer0/e1', 10)] == 0.25
  assert scalars[('expert_fraction/layer1/e3', 10)] == 0.25
  assert scalars[('member_loss/1', 10)] == 2.0
  assert len([tag for tag, _ in scalars if tag.startswith('expert_fraction/')]) == 8


def test_rejects_non_numeric_values(tmp_path):
  writer = metrics.MetricWriter(tmp_path)
  with pytest.raises(ValueError, match="metric 'config'"):
    writer.write(0, {'config': {'a': 1}})
  writer.close()


def test_disabled_writer_writes_nothing(tmp_path):
  writer = metrics.MetricWriter(tmp_path / 'run', enabled=False)
  writer.write(1, {'loss': 1.0})
  writer.truncate_after(0)
  writer.flush()
  writer.close()
  assert not os.path.exists(tmp_path / 'run')


def test_resume_appends_and_truncate_after(tmp_path):
  writer = metrics.MetricWriter(tmp_path)
  for step in range(1, 6):
    writer.write(step, {'loss': float(step)})
  writer.close()
  # The killed run also left a torn last line.
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 6, "lo')

  resumed = metrics.MetricWriter(tmp_path)
  assert [r['step'] for r in metrics.read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
  resumed.truncate_after(3)
  resumed.write(4, {'loss': 40.0})
  resumed.write(5, {'eval_loss': 50.0})
  resumed.close()
  assert read_jsonl(tmp_path) == [{'step': 1, 'loss': 1.0}, {'step': 2, 'loss': 2.0}, {'step': 3, 'loss': 3.0},
                                  {'step': 4, 'loss': 40.0}, {'step': 5, 'eval_loss': 50.0}]
  assert not os.path.exists(tmp_path / 'metrics.jsonl.tmp')


def test_truncate_with_nothing_to_drop_keeps_the_files(tmp_path):
  writer = metrics.MetricWriter(tmp_path)
  writer.write(1, {'loss': 1.0})
  writer.truncate_after(1)  # what a fresh or cleanly resumed run does
  writer.write(2, {'loss': 2.0})
  writer.close()
  assert read_jsonl(tmp_path) == [{'step': 1, 'loss': 1.0}, {'step': 2, 'loss': 2.0}]
  assert len([n for n in os.listdir(tmp_path) if n.startswith('events.out.tfevents')]) == 1


def test_new_writer_after_torn_line_starts_a_fresh_line(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
  writer = metrics.MetricWriter(tmp_path)
  writer.write(3, {'loss': 3.0})
  writer.close()
  assert metrics.read_metrics(tmp_path) == [{'step': 1, 'loss': 1.0}, {'step': 3, 'loss': 3.0}]


@pytest.mark.parametrize('args,expected', [
    ((120, 1500, 2.345, 12_345.0, 252, {'mfu': 0.012}), 'step 120/1500 loss 2.345 tok/s 12.3k mfu 1.2% eta 4m12s'),
    ((5, 20, 5.6, 900.0, 3.4, None), 'step 5/20 loss 5.6 tok/s 900.0 eta 3s'),
    ((1, 10, 1.0, 2.5e6, 7500, {'lr': 3e-3, 'note': 'resumed'}),
     'step 1/10 loss 1 tok/s 2.5M lr 0.003 note resumed eta 2h05m'),
    ((1, 10, 1.0, 10.0, None, None), 'step 1/10 loss 1 tok/s 10.0'),
])
def test_format_progress(args, expected):
  assert metrics.format_progress(*args) == expected


@pytest.mark.parametrize('kind,flops', [
    ('NVIDIA H100 80GB HBM3', 989e12),
    ('NVIDIA H100 PCIe', 756e12),
    ('NVIDIA H200', 989e12),
    ('NVIDIA A100-SXM4-40GB', 312e12),
    ('TPU v4', 275e12),
    ('TPU v5 lite', 197e12),
    ('TPU v5p', 459e12),
    ('TPU v6 lite', 918e12),
    ('cpu', None),
    ('Some Future Accelerator', None),
])
def test_peak_flops_per_device(kind, flops):
  assert metrics.peak_flops_per_device(types.SimpleNamespace(device_kind=kind)) == flops


def test_peak_flops_defaults_to_the_first_device(monkeypatch):
  # Whatever this machine has: the default reads jax.devices()[0].
  fake = [types.SimpleNamespace(device_kind=kind) for kind in ('NVIDIA H100 PCIe', 'cpu')]
  monkeypatch.setattr(metrics.jax, 'devices', lambda *args: fake)
  assert metrics.peak_flops_per_device() == 756e12


@pytest.mark.parametrize('with_eval,with_experts', [(True, True), (False, False)])
def test_plot_metrics(tmp_path, with_eval, with_experts):
  writer = metrics.MetricWriter(tmp_path)
  for step in range(0, 50, 5):
    extra = {'expert_fraction': np.full((2, 4), 0.25)} if with_experts else {'expert_fraction': np.zeros((0, 1))}
    writer.write(step, {'loss': 5.0 - 0.05 * step, **extra})
    if with_eval and step % 20 == 0:
      writer.write(step, {'eval_loss': 5.1 - 0.05 * step})
  writer.close()
  path = metrics.plot_metrics(tmp_path)
  assert path == os.path.join(tmp_path, 'metrics.png')
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  image = matplotlib.image.imread(path)
  assert image.shape[:2] == (400, 1100)
  assert image[..., :3].std() > 0.01  # something was drawn


def test_plot_metrics_without_file_names_it(tmp_path):
  with pytest.raises(FileNotFoundError, match='metrics.jsonl'):
    metrics.plot_metrics(tmp_path)


def test_resume_drops_a_line_torn_by_a_kill_mid_write(tmp_path):
  # A writer SIGKILLed between the two halves of a line's write (what a kill inside a long write
  # syscall leaves; waiting for that by chance takes too long to test).
  code = ('import os, sys, time; from moejax import metrics; w = metrics.MetricWriter(sys.argv[1])\n'
          'for step in range(1, 7): w.write(step, {"loss": 1.0 / step})\n'
          'w.flush(); line = b\'{"step": 7, "loss": 0.142857\'\n'
          'os.write(w._file.fileno(), line[:17]); print("torn", flush=True); time.sleep(600)\n')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  writer = subprocess.Popen([sys.executable, '-c', code, str(tmp_path)], stdout=subprocess.PIPE,
                            env={**os.environ, 'PYTHONPATH': repo, 'JAX_PLATFORMS': 'cpu'})
  assert writer.stdout.readline() == b'torn\n'
  writer.kill()
  writer.wait()
  with pytest.raises(json.JSONDecodeError):
    read_jsonl(tmp_path)  # the fault: a strict JSONL reader fails on the torn line

  resumed = metrics.MetricWriter(tmp_path)
  resumed.truncate_after(6)  # the restored checkpoint's step: no whole line lies past it
  resumed.write(7, {'loss': 0.5})
  resumed.close()
  assert read_jsonl(tmp_path) == [{'step': s, 'loss': 1.0 / s} for s in range(1, 7)] + [{'step': 7, 'loss': 0.5}]
