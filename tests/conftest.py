"""Every test process gets 8 fake CPU devices, so sharded code runs on a laptop.

This must run before anything touches a JAX backend; tests that want one device use
`jax.devices()[:1]`.
"""
import jax

jax.config.update('jax_num_cpu_devices', 8)
