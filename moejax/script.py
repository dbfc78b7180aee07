"""What every experiment script (experiments/*.py) does first, in one place."""
from absl import app
from absl import flags
from absl import logging

from moejax import cpu_devices
from moejax import host_memory


def start(argv) -> None:
  """Rejects positional arguments (a flag typed without its '--' would otherwise be ignored),
  quiets absl's INFO logs, which orbax's would drown the output with, unless --verbosity is given,
  keeps XLA's freed CPU buffers mapped for reuse (moejax.host_memory) and makes one CPU device per
  core (moejax.cpu_devices). Both must come before the backend starts, and every script, benchmarks
  included, should see the same allocator and devices (evaluate.py then reproduces train.py's
  eval loss exactly)."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  host_memory.reuse_freed_memory()
  cpu_devices.use_one_per_core()
