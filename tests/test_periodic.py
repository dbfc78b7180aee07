"""Tests for moejax.periodic: when actions are due, their order, and the step timer."""
import time

import jax.numpy as jnp

from moejax import periodic


def test_actions_run_on_their_period_the_last_step_and_on_stop_in_order():
  calls = []
  def record(name):
    return lambda step, state, metrics: calls.append((name, step))
  actions = (periodic.PeriodicAction('log', 2, record('log')),
             periodic.PeriodicAction('save', 3, record('save'), on_stop=True))
  ran = [periodic.run_due(actions, step, 7, step == 5, None, {}) for step in range(1, 8)]
  assert calls == [('log', 2), ('save', 3), ('log', 4), ('save', 5), ('log', 6), ('save', 6),
                   ('log', 7), ('save', 7)]
  assert ran == [False, True, True, True, True, True, True]


def test_step_timer_times_nothing_until_restarted_then_steps_since_the_restart():
  timer = periodic.StepTimer()
  assert not timer.started and timer.seconds_per_step(3) is None
  timer.restart(3, {'loss': jnp.zeros(())})
  assert timer.started and timer.seconds_per_step(3) is None
  time.sleep(0.02)
  per_step = timer.seconds_per_step(5)
  assert 0.01 <= per_step < 1.0  # 0.02 s over 2 steps
