"""One JAX CPU device per core, so that a data-parallel step keeps every core busy.

XLA's CPU runtime runs one device's step on a pool of threads but overlaps its ops little:
moe_tiny's step on 2 cores was only 1.1-1.25x faster than pinned to one (docs/benchmarks.md). With
one device per core and the batch split over them (the configs' default mesh puts every device on
the data axis; the MoE layers then dispatch per device, moejax.expert_parallel) each core runs its
own share of the step. The maths is that of one device up to float summation order: the loss and
gradients become sums over the devices' shares.
"""
import os

import jax

# Batch sizes are multiples of small powers of two (the smoke configs' is 8); a count that does not
# divide them would stop the run at the mesh check.
_MAX_DEVICES = 8


def use_one_per_core() -> int:
  """Sets `jax_num_cpu_devices` to the usable cores, rounded down to a power of two and at most
  8, unless the user chose a count (JAX_NUM_CPU_DEVICES or `jax_num_cpu_devices`); must run
  before the backend starts. Other platforms' devices are not affected. Returns the count."""
  if 'JAX_NUM_CPU_DEVICES' in os.environ or jax.config.jax_num_cpu_devices != -1:
    return jax.config.jax_num_cpu_devices
  usable = (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')  # Linux
            else os.cpu_count() or 1)
  cores = min(usable, _MAX_DEVICES)
  count = 1 << (cores.bit_length() - 1)
  jax.config.update('jax_num_cpu_devices', count)
  return count
