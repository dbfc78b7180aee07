"""Every test process gets 8 fake CPU devices, so sharded code runs on a laptop.

This must run before anything touches a JAX backend; tests that want one device use
`jax.devices()[:1]`.
"""
import atexit
import os
import shutil
import tempfile

# Tests compile many tiny programs and run each a few times: XLA's CPU backend optimisations cost
# more compile time than they save. Subprocesses spawned by tests inherit this.
os.environ.setdefault('XLA_FLAGS', '--xla_backend_optimization_level=0')
# Most tests train the same smoke configs, in-process or in subprocesses: one JAX compilation
# cache for the whole run (the first process to load this file makes it, so pytest-xdist workers
# and the subprocesses they spawn inherit it) compiles each program once. Jax's cache key covers
# the program, the XLA flags and the devices, so a hit runs the same executable as a compile.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='moejax-tests-jax-cache-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'

import jax  # pylint: disable=g-import-not-at-top

jax.config.update('jax_num_cpu_devices', 8)
# Float32 comparisons in the tests assume float32 matmuls; GPUs default to TF32 (about 1e-3).
jax.config.update('jax_default_matmul_precision', 'highest')
