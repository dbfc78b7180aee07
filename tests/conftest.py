"""Every test process gets 8 fake CPU devices, so sharded code runs on a laptop.

This must run before anything touches a JAX backend; tests that want one device use
`jax.devices()[:1]`.
"""
import os

# Tests compile many tiny programs and run each a few times: XLA's CPU backend optimisations cost
# more compile time than they save. Subprocesses spawned by tests inherit this.
os.environ.setdefault('XLA_FLAGS', '--xla_backend_optimization_level=0')

import jax  # pylint: disable=g-import-not-at-top

jax.config.update('jax_num_cpu_devices', 8)
# Float32 comparisons in the tests assume float32 matmuls; GPUs default to TF32 (about 1e-3).
jax.config.update('jax_default_matmul_precision', 'highest')
