"""Host malloc settings that let XLA's CPU runtime reuse its step buffers instead of faulting in
fresh pages every step.

XLA's CPU runtime mallocs each execution's temporaries as one block (648 MiB for moe_tiny's train
step) and frees it when the step ends. glibc serves a block above its mmap threshold (32 MiB at
most) with a fresh `mmap`, and a block larger than a thread arena's 64 MiB heap with `mmap`
whatever the threshold, then unmaps it on free; the runtime's worker threads allocate from such
thread arenas. So every step touched 166 k fresh zero pages: about a quarter of the step's CPU
time went to the kernel's page faults (docs/benchmarks.md). With one arena, no mmap and no
trimming below 2 GiB of free heap, the freed block stays in the heap and the next step reuses it:
no page faults after the first few steps. The price: the heap never shrinks, and it may hold a
few such blocks, since a new block does not always fit the hole the last one left (moe_tiny:
2.6 GiB resident from step 21 on); and all threads share one arena lock (XLA allocates little per
step besides its buffers).

`reuse_freed_memory()` must run before the JAX backend starts (before the first array or
`jax.devices()`): threads that already allocated keep their arenas. `moejax.script.start` calls
it first thing in every experiment script; a notebook or program that trains on CPU can too. On
other C libraries (macOS, musl) it does nothing and returns False.
"""
import ctypes
import ctypes.util

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# Free memory at the heap's top beyond this goes back to the OS (mallopt takes a C int: 2 GiB).
_TRIM_THRESHOLD = 2**31 - 1


def _glibc_mallopt():
  """glibc's mallopt, or None when the process runs on another C library."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    gnu_get_libc_version = libc.gnu_get_libc_version
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return None
  del gnu_get_libc_version  # present only in glibc, whose mallopt takes these parameters
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  return mallopt


def reuse_freed_memory() -> bool:
  """Keeps freed heap memory mapped for reuse (see the module docstring); True when applied."""
  mallopt = _glibc_mallopt()
  if mallopt is None:
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
  return all(mallopt(param, value) == 1 for param, value in settings)
