"""Periodic actions of the training loop and the step timer they keep honest.

An action (progress line, eval, checkpoint) is built before the loop with its period, then runs
after every step it is due at; the loop itself only steps, asks which actions are due and restarts
the timer. The pattern follows clu's periodic actions and vmoe's trainer hooks.
"""
import dataclasses
import time
from typing import Any, Callable, Sequence

import jax


@dataclasses.dataclass(frozen=True)
class PeriodicAction:
  """Calls `fn(step, state, metrics)` after every `every`-th step and after the last step;
  an `on_stop` action also runs at the step where the run stops early (preemption), and any
  action runs after every step while its `overdue()` says it could not do its work when due.

  metrics: the step's device metrics (read them with jax.device_get only when needed).
  """
  name: str
  every: int
  fn: Callable[[int, Any, dict], None]
  on_stop: bool = False
  overdue: Callable[[], bool] = lambda: False

  def due(self, step: int, num_steps: int, stopping: bool) -> bool:
    return (step % self.every == 0 or step == num_steps or (stopping and self.on_stop)
            or self.overdue())


def run_due(actions: Sequence[PeriodicAction], step: int, num_steps: int, stopping: bool,
            state, metrics) -> bool:
  """Runs the due actions in order (later ones may read what earlier ones recorded); returns
  whether any ran."""
  due = [action for action in actions if action.due(step, num_steps, stopping)]
  for action in due:
    action.fn(step, state, metrics)
  return bool(due)


class StepTimer:
  """Wall-clock seconds per train step since the last `restart`.

  Restart it after the first step of a run (so compilation is not timed) and after any action
  ran (so eval and checkpoint time stay out of step_time); until the first restart it times
  nothing.
  """

  def __init__(self):
    self._start: tuple[float, int] | None = None

  @property
  def started(self) -> bool:
    return self._start is not None

  def restart(self, step: int, metrics) -> None:
    jax.block_until_ready(metrics)  # the step's work is done: it belongs before the mark
    self._start = (time.perf_counter(), step)

  def seconds_per_step(self, step: int) -> float | None:
    """None until restarted, or when no step ran since the restart."""
    if self._start is None or step == self._start[1]:
      return None
    start_time, start_step = self._start
    return (time.perf_counter() - start_time) / (step - start_step)
