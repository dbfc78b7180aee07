"""host_memory.reuse_freed_memory: XLA's large CPU temporaries stop faulting in fresh pages."""
import os
import subprocess
import sys

import pytest

from moejax import host_memory

# A child process times minor page faults over repeated calls of a jitted function whose
# temporaries (the [4608, 4096] float32 product and its running sum, 72 MiB each: above glibc's
# mmap threshold and a thread arena's heap) cannot be fused away. Prints faults per call and the
# pages of one such buffer.
_CHILD = """
import resource, sys
import jax, jax.numpy as jnp
from moejax import host_memory
if sys.argv[1] == 'reuse':
  assert host_memory.reuse_freed_memory()
f = jax.jit(lambda a, b: jnp.cumsum(a @ b, axis=0)[-1])
a, b = jnp.ones((4608, 8)), jnp.ones((8, 4096))
f(a, b).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
  f(a, b).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 40, 4608 * 4096 * 4 / 4096)
"""


def _faults_per_call(mode):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out = subprocess.run([sys.executable, '-c', _CHILD, mode], env=env, check=True,
                       capture_output=True, text=True).stdout.split()
  return float(out[0]), float(out[1])


@pytest.mark.skipif(host_memory._glibc_mallopt() is None or 'LD_PRELOAD' in os.environ,
                    reason='glibc malloc behaviour (another C library or allocator is in use)')
def test_reuse_freed_memory_stops_per_call_page_faults():
  plain, pages = _faults_per_call('plain')
  reused, _ = _faults_per_call('reuse')
  # glibc's default maps the temporaries afresh on every call and unmaps them after...
  assert plain > pages, (plain, pages)
  # ...whereas with the settings they stay in the heap. The heap still grows now and then (an
  # aligned request does not fit the hole its predecessor left) until the holes coalesce.
  assert reused < plain / 2, (reused, plain)
