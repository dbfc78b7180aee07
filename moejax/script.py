"""What every experiment script (experiments/*.py) does first, in one place."""
from absl import app
from absl import flags
from absl import logging


def start(argv) -> None:
  """Rejects positional arguments (a flag typed without its '--' would otherwise be ignored) and
  quiets absl's INFO logs, which orbax's would drown the output with, unless --verbosity is given."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
