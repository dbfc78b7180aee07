"""Evaluates the latest checkpoint of a training workdir and prints the metrics as JSON.

  python experiments/evaluate.py --workdir=/tmp/moe_tiny

Uses the run's own config (workdir/config.json) and the validation batches training evaluated
on, so it reproduces the last eval line of metrics.jsonl when run on the same devices.
"""
import json

from absl import app
from absl import flags
from absl import logging

from moejax import train
from moejax import workdir as workdir_lib

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir.', required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax's INFO logs would drown the output
  config = workdir_lib.load_config(_WORKDIR.value)
  print(json.dumps(train.evaluate(config, _WORKDIR.value), indent=2))


if __name__ == '__main__':
  app.run(main)
