"""Checkpoints: a thin wrapper around orbax's CheckpointManager, plus the SIGTERM flag of the train loop.

Layout: `directory/<step>/state/...` (one orbax item named 'state'), with `directory/<step>/metrics` when the save
carried metrics. Retention keeps the last `keep` checkpoints plus the one with the lowest `best_metric` (eval loss)
among those saved with metrics: an orbax preservation policy `AnyPreservationPolicy([LatestN, BestN])`, because
orbax's `max_to_keep` + `best_fn` alone keeps only the best N and would delete the newest checkpoint, the one a
resumed run needs.

Atomicity: orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when complete, then the
directory holds `commit_success.txt`. Only steps with that marker count here (`latest_step`, `restore`), so a run
killed mid-save resumes from the previous complete checkpoint; leftovers of such a save are removed when a
Checkpointer opens the directory.
"""
import os
import shutil
import signal
import threading

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

COMMIT_MARKER = 'commit_success.txt'
_ITEM = 'state'


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
    return self._manager.save(step, args=ocp.args.Composite(**{_ITEM: ocp.args.StandardSave(state)}),
                              metrics=metrics, force=force)

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

  def restore_latest(self, abstract_state):
    """(step, state) of the newest complete checkpoint, or (None, None) when there is none."""
    step = self.latest_step()
    if step is None:
      return None, None
    return step, self.restore(step, abstract_state)

  def metrics(self, step):
    """The metrics saved with `step`, or None."""
    return self._manager.metrics(step)

  def reached_preemption(self, step):
    """Whether the cluster announced a preemption (jax's preemption sync; multi-host runs agree on `step`)."""
    return self._manager.reached_preemption(step)

  def wait(self):
    """Blocks until in-flight async saves are complete."""
    self._manager.wait_until_finished()

  def close(self):
    """Waits for in-flight saves and releases orbax's threads."""
    self._manager.wait_until_finished()
    self._manager.close()


def install_sigterm_flag():
  """Installs a SIGTERM handler that only records the signal; returns `() -> bool`, whether SIGTERM arrived.

  The train loop polls it each step (together with `Checkpointer.reached_preemption`), saves and returns
  normally, so a preempted job exits 0 with a checkpoint at the step it reached. Must be called from the main
  thread (Python's `signal` rule).
  """
  received = threading.Event()

  def handler(signum, frame):
    del signum, frame
    received.set()

  signal.signal(signal.SIGTERM, handler)
  return received.is_set
