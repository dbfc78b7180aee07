"""Metric logging: JSON lines + TensorBoard, the console progress line, peak FLOP/s, and a summary plot.

Shapes: L MoE layers, E experts (`expert_fraction` is logged as [L, E]).

`workdir/metrics.jsonl` holds one JSON object per line: `step` plus the metrics, scalars as floats and arrays as
(nested) lists; train lines carry `loss`, eval lines `eval_loss`. The file is only ever appended to, so a resumed
run continues it; `truncate_after(step)` first drops the lines a killed run wrote past the restored checkpoint and
any line a kill tore, so every line of the file parses again.
"""
import json
import math
import os

from absl import logging
import jax
import numpy as np
import tensorboardX

METRICS_FILE = 'metrics.jsonl'
PLOT_FILE = 'metrics.png'

# Dense bf16 peak FLOP/s per device (vendor datasheets, without sparsity), matched by substrings of
# `device.device_kind`, first match wins, so specific names come before general ones.
_PEAK_FLOPS = (
    (('h200',), 989e12),
    (('h100', 'pcie'), 756e12),
    (('h100',), 989e12),
    (('a100',), 312e12),
    (('tpu v4',), 275e12),
    (('tpu v5 lite',), 197e12),
    (('tpu v5e',), 197e12),
    (('tpu v5',), 459e12),
    (('tpu v6',), 918e12),
)


def _to_json(key, value):
  """A metric value as JSON data: scalars -> float, arrays -> nested lists of floats, str unchanged."""
  if isinstance(value, str):
    return value
  array = np.asarray(jax.device_get(value))
  if array.dtype.kind not in 'biuf':
    raise ValueError(f'metric {key!r}: expected a number, array or str, got {type(value).__name__} '
                     f'of dtype {array.dtype}')
  array = array.astype(np.float64)
  return float(array) if array.ndim == 0 else array.tolist()


def _scalar_names(key, array):
  """TensorBoard (name, value) pairs for an array metric: [L, E] -> key/layer{l}/e{e}; others key/i/j/..."""
  for index in np.ndindex(array.shape):
    if array.ndim == 2:
      suffix = f'layer{index[0]}/e{index[1]}'
    else:
      suffix = '/'.join(str(i) for i in index)
    yield f'{key}/{suffix}', float(array[index])


def read_metrics(workdir):
  """The JSON objects of `workdir/metrics.jsonl`, in file order; a torn last line (a killed write) is skipped."""
  records = []
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


class MetricWriter:
  """Writes metrics to `workdir/metrics.jsonl` and TensorBoard event files in `workdir`.

  Args:
    workdir: the run's directory (created if missing).
    enabled: False on non-zero processes of a multi-host run: then every method does nothing.
  """

  def __init__(self, workdir, enabled=True):
    self.workdir = os.fspath(workdir)
    self.path = os.path.join(self.workdir, METRICS_FILE)
    self.enabled = enabled
    self._file = None
    self._tb = None
    if enabled:
      os.makedirs(self.workdir, exist_ok=True)
      self._open()
      self._tb = tensorboardX.SummaryWriter(self.workdir)

  def _open(self):
    self._file = open(self.path, 'a')
    # A run killed mid-write leaves a line without its newline; start on a fresh line so ours stay parseable.
    if self._file.tell() > 0:
      with open(self.path, 'rb') as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b'\n':
          self._file.write('\n')

  def write(self, step, metrics):
    """Appends {'step': step, **metrics} as one JSON line and adds each number as a TensorBoard scalar."""
    if not self.enabled:
      return
    record = {'step': int(step)}
    record.update((key, _to_json(key, value)) for key, value in metrics.items())
    self._file.write(json.dumps(record) + '\n')
    for key, value in record.items():
      if key == 'step' or isinstance(value, str):
        continue
      if isinstance(value, float):
        self._tb.add_scalar(key, value, int(step))
      else:
        for name, element in _scalar_names(key, np.asarray(value)):
          self._tb.add_scalar(name, element, int(step))

  def truncate_after(self, step):
    """Repairs metrics.jsonl for a run resuming at `step`: drops the lines past `step` and every line
    that does not parse (a write torn by a kill), atomically, and the TensorBoard events after `step`.

    Keeps the files untouched when there is nothing to drop.
    """
    if not self.enabled:
      return
    with open(self.path) as f:
      lines = f.readlines()
    kept, torn, later = [], 0, 0
    for line in lines:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        torn += 1
        continue
      if record['step'] > step:
        later += 1
      else:
        kept.append(line if line.endswith('\n') else line + '\n')
    if not torn and not later:
      return
    logging.warning('%s: dropped %d line(s) past step %d and %d that did not parse (torn writes)',
                    self.path, later, step, torn)
    self._file.close()
    tmp_path = self.path + '.tmp'
    with open(tmp_path, 'w') as f:
      f.writelines(kept)
    os.replace(tmp_path, self.path)
    self._open()
    # purge_step makes TensorBoard discard the old events at steps >= purge_step when it reads the directory.
    self._tb.close()
    self._tb = tensorboardX.SummaryWriter(self.workdir, purge_step=int(step) + 1)

  def flush(self):
    if self.enabled:
      self._file.flush()
      self._tb.flush()

  def close(self):
    if self.enabled:
      self._file.close()
      self._tb.close()


def _format_count(value):
  """12345.6 -> '12.3k'."""
  for threshold, suffix in ((1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
    if abs(value) >= threshold:
      return f'{value / threshold:.1f}{suffix}'
  return f'{value:.1f}'


def _format_duration(seconds):
  """252 -> '4m12s', 7500 -> '2h05m'."""
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  if hours:
    return f'{hours}h{minutes:02d}m'
  if minutes:
    return f'{minutes}m{seconds:02d}s'
  return f'{seconds}s'


def format_progress(step, num_steps, loss, tokens_per_s, eta_s, extra=None):
  """One console line, e.g. 'step 120/1500 loss 2.345 tok/s 12.3k mfu 1.2% eta 4m12s'.

  Args:
    step, num_steps: progress.
    loss: train loss.
    tokens_per_s: throughput.
    eta_s: seconds left, or None (omitted).
    extra: optional {name: value} shown after tok/s in order: `mfu` is a fraction of peak shown as a percentage,
      other numbers get 4 significant digits, strings are shown as they are.
  """
  parts = [f'step {step}/{num_steps}', f'loss {loss:.4g}', f'tok/s {_format_count(tokens_per_s)}']
  for name, value in (extra or {}).items():
    if isinstance(value, str):
      parts.append(f'{name} {value}')
    elif name == 'mfu':
      parts.append(f'{name} {100 * value:.1f}%')
    else:
      parts.append(f'{name} {value:.4g}')
  if eta_s is not None and math.isfinite(eta_s):
    parts.append(f'eta {_format_duration(eta_s)}')
  return ' '.join(parts)


def peak_flops_per_device(device=None):
  """Dense bf16 peak FLOP/s of `device` (default: the first device), or None for CPUs and unknown kinds."""
  device = device or jax.devices()[0]
  kind = device.device_kind.lower()
  for substrings, flops in _PEAK_FLOPS:
    if all(s in kind for s in substrings):
      return flops
  return None


def plot_metrics(workdir):
  """Writes `workdir/metrics.png` from metrics.jsonl and returns its path.

  Left: train loss and eval loss against step (eval absent until the first eval). Right: the expert load at the
  last step that logged `expert_fraction`, one row per MoE layer (a note instead for dense models).
  """
  # Imported here so that training runs on machines without matplotlib (see train_and_evaluate).
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  records = read_metrics(workdir)
  train = [(r['step'], r['loss']) for r in records if 'loss' in r]
  evals = [(r['step'], r['eval_loss']) for r in records if 'eval_loss' in r]
  # Dense models log an empty [0, 1] expert_fraction.
  loads = [r for r in records if np.size(r.get('expert_fraction', [])) > 0]

  fig = Figure(figsize=(11, 4), layout='constrained')
  FigureCanvasAgg(fig)
  loss_ax, load_ax = fig.subplots(1, 2)
  if train:
    loss_ax.plot(*zip(*train), label='train loss')
  if evals:
    loss_ax.plot(*zip(*evals), marker='o', label='eval loss')
  loss_ax.set_xlabel('step')
  loss_ax.set_ylabel('loss (nats/token)')
  loss_ax.grid(alpha=0.3)
  if train or evals:
    loss_ax.legend()

  if loads:
    fraction = np.atleast_2d(np.asarray(loads[-1]['expert_fraction'], dtype=np.float64))
    image = load_ax.imshow(fraction, aspect='auto', cmap='viridis', vmin=0.0)
    fig.colorbar(image, ax=load_ax, label='share of token slots')
    load_ax.set_xlabel('expert')
    load_ax.set_ylabel('MoE layer')
    load_ax.set_xticks(range(fraction.shape[1]))
    load_ax.set_yticks(range(fraction.shape[0]))
    load_ax.set_title(f'expert load at step {loads[-1]["step"]} (balanced = {1 / fraction.shape[-1]:.3g})')
  else:
    load_ax.axis('off')
    load_ax.text(0.5, 0.5, 'no expert_fraction logged', ha='center', va='center')

  path = os.path.join(workdir, PLOT_FILE)
  fig.savefig(path, dpi=100)
  return path
