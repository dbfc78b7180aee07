"""cpu_devices.use_one_per_core: one CPU device per usable core, unless the user chose a count."""
import os
import subprocess
import sys

import pytest

# The count must be set before the backend starts, so each case runs in a fresh process.
_CHILD = """
import os, sys
if len(sys.argv) > 1:  # pinned here, not by preexec_fn: forking a multithreaded parent can deadlock
  os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(',')})
import jax
from moejax import cpu_devices
print(cpu_devices.use_one_per_core(), jax.device_count())
"""


def _child(cores=None, **env):
  """(count returned, jax.device_count()) in a fresh process, on `cores` (a set of CPUs) if given."""
  base = {k: v for k, v in os.environ.items() if k != 'JAX_NUM_CPU_DEVICES'}
  pin = [','.join(map(str, sorted(cores)))] if cores else []
  out = subprocess.run([sys.executable, '-c', _CHILD, *pin],
                       env={**base, 'JAX_PLATFORMS': 'cpu', **env},
                       check=True, capture_output=True, text=True).stdout.split()
  return int(out[0]), int(out[1])


@pytest.mark.skipif(not hasattr(os, 'sched_setaffinity'), reason='pins the child to cores (Linux)')
def test_one_device_per_usable_core_rounded_down_to_a_power_of_two():
  usable = sorted(os.sched_getaffinity(0))
  for count, expected in ((1, 1), (2, 2), (3, 2)):
    if count <= len(usable):
      assert _child(set(usable[:count])) == (expected, expected), count


def test_a_count_the_user_chose_is_kept():
  assert _child(JAX_NUM_CPU_DEVICES='3') == (3, 3)
