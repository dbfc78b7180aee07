"""Evaluates the latest checkpoint of a training workdir and prints the metrics as JSON.

  python experiments/evaluate.py --workdir=/tmp/moe_tiny
  python experiments/evaluate.py --workdir=/tmp/moe_tiny --quantize=int8 --precision=bf16

Uses the run's own config (workdir/config.json) and the validation batches training evaluated
on, so it reproduces the last eval line of metrics.jsonl when run on the same devices (without
--precision or --quantize). The JSON also names the compute `precision`, the `quantize` mode and
the routed experts' `expert_weight_bytes`.
"""
import json

from absl import app
from absl import flags
from absl import logging

from moejax import train
from moejax import workdir as workdir_lib

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir.', required=True)
_PRECISION = flags.DEFINE_enum('precision', None, ['fp32', 'bf16', 'fp16'],
                               "Compute dtype at inference; default: the run's own.")
_QUANTIZE = flags.DEFINE_enum('quantize', 'none', ['none', 'int8'],
                              'int8: routed expert weights stored int8 (per-expert, per-output-'
                              'channel scales), dequantised into the grouped matmul.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax's INFO logs would drown the output
  config = workdir_lib.load_config(_WORKDIR.value)
  print(json.dumps(train.evaluate(config, _WORKDIR.value, _PRECISION.value or '',
                                  _QUANTIZE.value), indent=2))


if __name__ == '__main__':
  app.run(main)
