"""Checkpoints: a thin wrapper around orbax's CheckpointManager, plus the stop-signal flag of the train loop.

Layout: `directory/<step>/state/...` (one orbax item named 'state'), with `directory/<step>/metrics` when the save
carried metrics. Retention keeps the last `keep` checkpoints plus the one with the lowest `best_metric` (eval loss)
among those saved with metrics: an orbax preservation policy `AnyPreservationPolicy([LatestN, BestN])`, because
orbax's `max_to_keep` + `best_fn` alone keeps only the best N and would delete the newest checkpoint, the one a
resumed run needs.

Atomicity: orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when complete, then the
directory holds `commit_success.txt`. Only steps with that marker count here (`latest_step`, `restore`), so a run
killed mid-save resumes from the previous complete checkpoint; leftovers of such a save are removed when a
Checkpointer opens the directory.

Damage: `restore_latest` walks back from the newest complete step to the newest one that restores completely
(a truncated array file, a lost `_METADATA`), warning about each step it passes over and deleting nothing. A
step whose saved shapes or dtypes do not fit the target is not damage: that raises `CheckpointMismatch`.
A background save that fails (full disk, permissions) raises `SaveError` at the next `save`, `check` or `wait`.
"""
import os
import shutil
import signal
import threading

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

COMMIT_MARKER = 'commit_success.txt'
_ITEM = 'state'


class CheckpointMismatch(ValueError):
  """A complete checkpoint whose saved leaves do not fit the state it was asked to restore into.

  step: the step checked. leaves: one line per leaf that does not fit, in the target's order.
  """

  def __init__(self, step, directory, leaves):
    self.step, self.directory, self.leaves = step, directory, leaves
    super().__init__(f'the checkpoint at step {step} in {directory} does not fit: {"; ".join(leaves[:3])}'
                     f'{" ..." if len(leaves) > 3 else ""}')


class SaveError(RuntimeError):
  """A save that did not complete; the message names the step directory and the error."""


def leaf_name(path):
  """A key path as orbax names the saved array: `opt_state.1.mu.embedding`."""
  parts = []
  for key in path:
    for attribute in ('key', 'name', 'idx'):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
    else:
      parts.append(str(key))
  return '.'.join(parts)


def _describe(leaf):
  return f'{list(leaf.shape)} {np.dtype(leaf.dtype).name}'


def _as_stored(leaf):
  """Typed PRNG keys (key<fry>) are stored as their uint32 key data."""
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    return jax.eval_shape(jax.random.key_data, leaf)
  return leaf


def mismatched_leaves(abstract_state, saved):
  """Lines naming each leaf of `abstract_state` that `saved` ({name: leaf with shape and dtype}) lacks or
  stores with another shape or dtype, then each saved leaf the state lacks; [] when everything fits."""
  wanted = {leaf_name(path): _as_stored(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state)}
  lines = []
  for name, leaf in wanted.items():
    if name not in saved:
      lines.append(f'{name} {_describe(leaf)} is not in the checkpoint')
    elif _describe(saved[name]) != _describe(leaf):
      lines.append(f'{name} is {_describe(saved[name])} in the checkpoint, {_describe(leaf)} here')
  lines.extend(f'{name} {_describe(leaf)} is in the checkpoint only' for name, leaf in saved.items()
               if name not in wanted)
  return lines


class Checkpointer:
  """Saves and restores one pytree (the train state) per step under `directory`.

  Args:
    directory: where steps are stored, e.g. `workdir/checkpoints`; created if missing.
    keep: number of most recent checkpoints kept.
    keep_best: also keep the checkpoint with the lowest `metrics[best_metric]`.
    async_save: write in a background thread; `save` returns once the arrays are copied off the devices.
    best_metric: the metric `save(..., metrics=...)` must carry when keep_best; lower is better.
    read_only: for readers (evaluate, generate) of a workdir that a run may be writing: deletes
      nothing (not even the debris of interrupted saves, which may be a save in flight) and cannot save.
  """

  def __init__(self, directory, keep=3, keep_best=True, async_save=True, best_metric='eval_loss',
               read_only=False):
    if keep < 1:
      raise ValueError(f'Checkpointer: keep must be >= 1, got {keep}')
    self.directory = os.path.abspath(os.fspath(directory))
    self.keep_best = keep_best
    self.best_metric = best_metric
    self.read_only = read_only
    self._saving = None  # the step of the latest save, named when a background save fails
    if read_only and not os.path.isdir(self.directory):
      raise ValueError(f'Checkpointer: no checkpoint directory {self.directory}')
    if not read_only:
      self._remove_uncommitted_steps()
    policies = [checkpoint_managers.LatestN(n=keep)]
    best_fn = None
    if keep_best:
      best_fn = lambda metrics: metrics[best_metric]
      policies.append(checkpoint_managers.BestN(get_metric_fn=best_fn, reverse=True, n=1,
                                                keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        best_fn=best_fn,
        best_mode='min',
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only,
        create=not read_only,
        read_only=read_only,
    )
    self._manager = ocp.CheckpointManager(self.directory, item_names=(_ITEM,), options=options)

  def _remove_uncommitted_steps(self):
    """Deletes step directories without the commit marker: debris of an interrupted non-atomic save."""
    if jax.process_index() == 0 and os.path.isdir(self.directory):
      for name in os.listdir(self.directory):
        path = os.path.join(self.directory, name)
        if name.isdigit() and os.path.isdir(path) and not os.path.exists(os.path.join(path, COMMIT_MARKER)):
          shutil.rmtree(path)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'moejax_checkpoint_cleanup:{self.directory}')

  def _is_committed(self, step):
    return os.path.exists(os.path.join(self.directory, str(step), COMMIT_MARKER))

  def _check_committed(self, step):
    if not self._is_committed(step):
      raise ValueError(f'Checkpointer: no complete checkpoint for step {step} in {self.directory} '
                       f'(complete steps: {self.all_steps()})')

  def all_steps(self):
    """Sorted steps with a complete checkpoint."""
    return sorted(s for s in self._manager.all_steps() if self._is_committed(s))

  def latest_step(self):
    """The newest complete step, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def best_step(self):
    """The complete step with the lowest `best_metric`, or None (no metrics saved, or keep_best=False)."""
    best = self._manager.best_step() if self.keep_best else None
    return best if best is not None and self._is_committed(best) else None

  def save(self, step, state, metrics=None, force=False):
    """Saves `state` (a pytree of arrays) at `step`; returns whether a save started.

    A step that already has a checkpoint (or one in flight) is not saved again, so the train loop may save the
    final step even when it coincides with a periodic save. `force` saves even when orbax's preemption and
    interval policies would not.

    Args:
      step: int training step.
      state: pytree of jax arrays (e.g. a flax struct TrainState); may be sharded across processes.
      metrics: optional {name: scalar or array}, stored as JSON beside the step; must contain `best_metric`
        (a scalar) when keep_best.
      force: passed to orbax.
    """
    if self.read_only:
      raise ValueError(f'Checkpointer.save: {self.directory} was opened read_only')
    step = int(step)
    if step in self._manager.all_steps():
      return False
    if metrics is not None:
      metrics = {k: np.asarray(jax.device_get(v), np.float64).tolist() for k, v in metrics.items()}
      if self.keep_best and self.best_metric not in metrics:
        raise ValueError(f'Checkpointer.save: metrics {sorted(metrics)} lack {self.best_metric!r}, which '
                         'keep_best ranks checkpoints by')
    # orbax waits for the previous save before it starts this one: wait here, so that a failure of
    # the previous save is reported under its own step.
    self.wait()
    self._saving = step
    try:
      return self._manager.save(step, args=ocp.args.Composite(**{_ITEM: ocp.args.StandardSave(state)}),
                                metrics=metrics, force=force)
    except Exception as error:  # pylint: disable=broad-except
      raise self._save_error(step, error) from error

  def _save_error(self, step, error):
    message = str(error).strip().splitlines()
    return SaveError(f'saving step {step} to {os.path.join(self.directory, str(step))} failed: '
                     f'{type(error).__name__}: {message[-1] if message else ""}; the earlier checkpoints '
                     f'{self.all_steps()} are intact')

  def check(self):
    """Raises SaveError if a background save has failed since the last check."""
    try:
      self._manager.check_for_errors()
    except Exception as error:  # pylint: disable=broad-except
      raise self._save_error(self._saving, error) from error

  def restore(self, step, abstract_state):
    """The state saved at `step`, laid out like `abstract_state`.

    Args:
      step: a complete step (see all_steps).
      abstract_state: pytree of jax.ShapeDtypeStruct with `.sharding` set (e.g. from
        `jax.eval_shape` plus the mesh's NamedShardings), so a checkpoint written on one mesh restores onto any
        other. Concrete arrays work too (their shardings are used).
    """
    self._check_committed(step)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{_ITEM: ocp.args.StandardRestore(abstract_state)}))
    return restored[_ITEM]

  def restore_fields(self, step, abstract_fields):
    """Only some top-level fields of the state saved at `step`: {name: abstract subtree} -> {name: subtree}.

    Reads nothing else, so a sampler restoring {'params': ...} never holds the optimizer state (twice the
    parameters' size with Adam) in memory. Abstract leaves as in `restore`.
    """
    self._check_committed(step)
    fields = dict(abstract_fields)
    args = ocp.args.PyTreeRestore(item=fields, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(fields))
    # A reader of its own: the manager's handler for the item is the StandardCheckpointHandler that
    # wrote it, which has no partial restore (orbax 0.12.8).
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
      restored = reader.restore(os.path.join(self.directory, str(step), _ITEM), args=args)
    # A partial restore hands back the abstract leaf, silently, for anything the checkpoint lacks.
    missing = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(restored)
               if isinstance(leaf, jax.ShapeDtypeStruct)]
    if missing:
      raise ValueError(f'Checkpointer.restore_fields: step {step} in {self.directory} has no '
                       f'{", ".join(missing[:5])}{" ..." if len(missing) > 5 else ""}')
    return restored

  def saved_tree(self, step):
    """The tree saved at `step` as nested dicts and lists of array metadata (.shape, .dtype); reads no
    array."""
    self._check_committed(step)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
      return reader.metadata(os.path.join(self.directory, str(step), _ITEM)).item_metadata.tree

  def restore_latest(self, abstract_state):
    """(step, state) of the newest complete checkpoint that restores completely, or (None, None) when the
    directory holds no complete checkpoint.

    Walks back over damaged steps (warning about each; nothing is deleted). Raises CheckpointMismatch when
    the newest readable step does not fit `abstract_state`, and ValueError naming the directory when no
    step restores.
    """
    def restore(step, saved):
      saved = {leaf_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(saved)}
      mismatched = mismatched_leaves(abstract_state, saved)
      if mismatched:
        raise CheckpointMismatch(step, self.directory, mismatched)
      return self.restore(step, abstract_state)
    return self._walk_back(restore)

  def restore_latest_fields(self, names, sharding):
    """(step, {name: subtree}) of top-level fields `names` of the newest checkpoint that restores, each
    array placed with `sharding`, in the structure, shapes and dtypes saved; (None, None) without one."""
    def restore(step, saved):
      fields = {name: jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                                   saved[name]) for name in names}
      # orbax cannot restore an empty subtree (a model without router state): it is empty anyway.
      restored = self.restore_fields(step, {k: v for k, v in fields.items() if jax.tree.leaves(v)})
      return {name: restored.get(name, fields[name]) for name in names}
    return self._walk_back(restore)

  def _walk_back(self, restore):
    """restore(step, saved tree) at the newest step where it succeeds; see restore_latest."""
    skipped = []
    for step in reversed(self.all_steps()):
      try:
        saved = self.saved_tree(step)
      except Exception as error:  # pylint: disable=broad-except
        skipped.append(self._skip(step, 'its metadata does not read', error))
        continue
      try:
        return step, restore(step, saved)
      except CheckpointMismatch:
        raise
      except Exception as error:  # pylint: disable=broad-except
        skipped.append(self._skip(step, 'it does not restore', error))
    if skipped:
      raise ValueError(f'no checkpoint in {self.directory} restores completely ({"; ".join(skipped)}); '
                       'move the directory away to start again')
    return None, None

  def _skip(self, step, what, error):
    lines = str(error).strip().splitlines()
    reason = f'step {step}: {what} ({type(error).__name__}: {lines[0][:200] if lines else ""})'
    logging.warning('Skipping the checkpoint at %s/%d: %s; trying the step before it (nothing deleted)',
                    self.directory, step, reason)
    return reason

  def metrics(self, step):
    """The metrics saved with `step`, or None."""
    return self._manager.metrics(step)

  def reached_preemption(self, step):
    """Whether the cluster announced a preemption (jax's preemption sync; multi-host runs agree on `step`)."""
    return self._manager.reached_preemption(step)

  def wait(self):
    """Blocks until in-flight async saves are complete; raises SaveError if one failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except
      raise self._save_error(self._saving, error) from error
    self.check()

  def close(self):
    """Waits for in-flight saves and releases orbax's threads (a failed save is logged here: `wait` is
    the call that reports it)."""
    try:
      self._manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except
      logging.error('%s', self._save_error(self._saving, error))
    try:
      self._manager.close()
    except Exception as error:  # pylint: disable=broad-except
      # orbax re-raises a failed save here; it was reported already.
      logging.info('closing %s after a failed save: %s', self.directory, error)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def install_stop_flag():
  """Installs handlers for SIGTERM and SIGINT (Ctrl-C) that only record the signal; returns `() -> bool`,
  whether one arrived.

  The train loop polls it each step (together with `Checkpointer.reached_preemption`), saves and returns
  normally, so a preempted or interrupted job exits 0 with a checkpoint at the step it reached. A second
  Ctrl-C ends the process at once: the first restores the system's default action for SIGINT. Must be called
  from the main thread (Python's `signal` rule).
  """
  received = threading.Event()

  def handler(signum, frame):
    del frame
    received.set()
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.SIG_DFL)

  for signum in STOP_SIGNALS:
    signal.signal(signum, handler)
  return received.is_set
