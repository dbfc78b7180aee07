"""Training workdirs: the config a run records, one trainer at a time, and whether a config fits the
run a workdir holds; `load_config` and `restore_params` for the scripts that read a workdir.

Files of a workdir W that this module owns:
  W/config.json           the run's config, written only once a run has passed every check
  W/config_changes.jsonl  one line per resume that changed the config:
                          {"step": resumed step, "changes": {"optim.learning_rate": [old, new], ...}}
  W/trainer.lock          flock'ed by the trainer for its whole run; holds "pid P on host H" meanwhile

Compatibility is decided by the train state, not by a list of keys: a resume may change any config
key as long as the abstract train state it builds (structure, shapes, dtypes) is the one the
checkpoint stored, e.g. the learning rate, the number of steps or the eval cadence. A change that
alters it (d_model, the expert count, fp16's loss-scale state, ...) fails with one line naming the
config keys that differ and the first leaves that would not fit.

The lock is an flock, so it dies with its process: a kill -9 leaves no stale lock. Readers
(evaluate, generate) take no lock; they read complete checkpoints only.
"""
import fcntl
import json
import os
import socket
from typing import Any

from absl import logging
import jax
import ml_collections

from moejax import checkpoint as checkpoint_lib

PyTree = Any

CONFIG_FILE = 'config.json'
CONFIG_CHANGES_FILE = 'config_changes.jsonl'
LOCK_FILE = 'trainer.lock'
CHECKPOINT_DIR = 'checkpoints'


class WorkdirInUse(RuntimeError):
  """Another trainer holds the workdir's lock."""


class IncompatibleWorkdir(ValueError):
  """The config does not fit the run (checkpoint) a workdir holds."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINT_DIR)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run recorded in `workdir/config.json`, locked (a typo in a key fails), with the
  mesh rules' JSON lists back as tuples."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise ValueError(f'{path} does not exist: --workdir must be a training workdir')
  with open(path) as f:
    tree = json.load(f)
  tree['mesh']['rules'] = tuple(
      (name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in tree['mesh']['rules'])
  ensemble = tree.get('ensemble', {})
  if 'holdout_fraction' in ensemble:  # recorded before the stacked/gated fit read the selection split
    del ensemble['holdout_fraction']
    ensemble['fit_batches'] = ensemble.pop('holdout_batches')
  config = ml_collections.ConfigDict(tree)
  config.lock()
  return config


def resumed_config(workdir: str, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """The run's own config (`load_config`) with `overrides` ({'optim.learning_rate': 1e-3, ...},
  e.g. the --config.x=y flags) set on top; an unknown key fails naming it."""
  config = load_config(workdir)
  for key, value in overrides.items():
    *sections, name = key.split('.')
    node = config
    for section in sections:
      node = node[section]
    node[name] = value
  return config


def _config_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def _flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (old value, new value)} for every key whose value differs (None when absent)."""
  old, new = _flatten(old), _flatten(new)
  return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
          if old.get(key) != new.get(key)}


def _format_changes(changes: dict) -> str:
  return '; '.join(f'{key}: {old!r} -> {new!r}' for key, (old, new) in changes.items())


class WorkdirLock:
  """The one-trainer lock of `workdir`: an exclusive flock on `workdir/trainer.lock`.

  Taking it writes nothing (a run that is then rejected leaves the workdir as it was);
  `record_holder` writes "pid P on host H" once the run has passed its checks, and `release`
  empties the file again. Raises WorkdirInUse, naming the holder, when another process holds it.
  """

  def __init__(self, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, LOCK_FILE)
    self._file = open(self.path, 'a+')  # pylint: disable=consider-using-with
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._file.seek(0)
      holder = self._file.read().strip() or 'a trainer still starting up'
      self._file.close()
      raise WorkdirInUse(f'{workdir} is in use by {holder} (it holds {self.path}); wait for it to '
                         'finish, stop it, or use another --workdir') from None
    self._recorded = False

  def record_holder(self):
    self._file.seek(0)
    self._file.truncate()
    self._file.write(f'pid {os.getpid()} on host {socket.gethostname()}\n')
    self._file.flush()
    self._recorded = True

  def release(self):
    if self._file.closed:
      return
    if self._recorded:
      self._file.truncate(0)
    fcntl.flock(self._file, fcntl.LOCK_UN)
    self._file.close()


def restore_for_training(workdir: str, config: ml_collections.ConfigDict, abstract_state: PyTree
                         ) -> tuple[int | None, PyTree]:
  """(step, state) of the newest checkpoint of `workdir` that restores completely into
  `abstract_state`, or (None, None) for a workdir without checkpoints. Reads only.

  Raises IncompatibleWorkdir (one line: the config keys that differ from the run's config.json
  and the first leaves that would not fit) when the checkpoint does not fit `config`.
  """
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return None, None
  ckpt = checkpoint_lib.Checkpointer(directory, read_only=True)
  try:
    return ckpt.restore_latest(abstract_state)
  except checkpoint_lib.CheckpointMismatch as mismatch:
    path = os.path.join(workdir, CONFIG_FILE)
    if os.path.exists(path):
      with open(path) as f:
        keys = _format_changes(config_changes(json.load(f), _config_json(config))) or 'none'
    else:
      keys = f'unknown ({path} is missing)'
    leaves = '; '.join(mismatch.leaves[:3]) + (' ...' if len(mismatch.leaves) > 3 else '')
    raise IncompatibleWorkdir(
        f'{workdir} holds a run this config does not fit: config keys that differ: {keys}; '
        f'leaves of the step-{mismatch.step} checkpoint that would not fit: {leaves}; use a new '
        '--workdir, or resume with the run\'s own config (--workdir alone)') from None
  finally:
    ckpt.close()


def record_config(workdir: str, config: ml_collections.ConfigDict, step: int) -> None:
  """Writes `config` to workdir/config.json (atomically); a change from the recorded config is
  logged and appended to workdir/config_changes.jsonl with the step it applies from."""
  path = os.path.join(workdir, CONFIG_FILE)
  new = _config_json(config)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    changes = config_changes(old, new)
    if not changes:
      return
    logging.warning('%s: the config changes from step %d on: %s (recorded in %s)', workdir, step,
                    _format_changes(changes), CONFIG_CHANGES_FILE)
    with open(os.path.join(workdir, CONFIG_CHANGES_FILE), 'a') as f:
      f.write(json.dumps({'step': int(step), 'changes': {k: list(v) for k, v in changes.items()}})
              + '\n')
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(new, f, indent=2)
  os.replace(tmp, path)


def restore_params(workdir: str) -> tuple[ml_collections.ConfigDict, PyTree, PyTree]:
  """(config, params, router_state) of the newest checkpoint of `workdir` that restores, on the
  first local device; the optimizer state is not read.

  The trees take the structure, shapes and dtypes the checkpoint stored, so nothing is built
  here; `build_model(config.model, get_policy(config.precision.policy))` gives the matching model.
  """
  config = load_config(workdir)
  ckpt = checkpoint_lib.Checkpointer(checkpoint_dir(workdir), read_only=True)
  try:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    step, fields = ckpt.restore_latest_fields(('params', 'router_state'), device)
  finally:
    ckpt.close()
  if step is None:
    raise ValueError(f'no checkpoint in {checkpoint_dir(workdir)}')
  return config, fields['params'], fields['router_state']
