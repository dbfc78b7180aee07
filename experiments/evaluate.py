"""Evaluates the latest checkpoint of a training workdir, or several fused as one ensemble.

  python experiments/evaluate.py --workdir=/tmp/moe_tiny
  python experiments/evaluate.py --workdir=/tmp/moe_tiny --quantize=int8 --precision=bf16
  python experiments/evaluate.py --workdir=/tmp/ensemble_tiny           # its members and fused
  python experiments/evaluate.py --workdirs=/tmp/a,/tmp/b --fusion=stacked
  python experiments/evaluate.py --workdirs=/tmp/a,/tmp/b --include='email/**'   # one domain

Prints the metrics as JSON on stdout, a table on stderr, and writes a reliability diagram (the
workdir's reliability.png, or --out). One model: step, eval_loss, eval_bits_per_byte,
eval_perplexity, accuracy, ece, the compute `precision`, the `quantize` mode and the routed
experts' `expert_weight_bytes`; an ensemble: members, fused, disagreement, mutual_information.
Uses the (first) run's own config and the validation batches training evaluated on, so a single
model reproduces the last eval line of metrics.jsonl when run on the same devices (without
--precision or --quantize).
A stacked or gated fusion is fitted on the first run's selection split, so every run must have
been trained with one data.selection_fraction > 0 (ensemble_tiny sets 0.02).
"""
import json

from absl import app
from absl import flags

from moejax import evaluation
from moejax import script

_FLAGS = evaluation.define_inference_flags('Training workdirs to fuse as one ensemble.')
flags.adopt_module_key_flags(evaluation)  # --helpshort lists them
_OUT = flags.DEFINE_string('out', None, 'Reliability diagram path; default: in the workdir.')
_INCLUDE = flags.DEFINE_string('include', None, "Score only these validation files (globs as "
                               "data.include, e.g. 'email/**'); default: the run's own.")


def main(argv):
  script.start(argv)
  result = evaluation.evaluate(out=_OUT.value, include=_INCLUDE.value, **_FLAGS.load_args())
  evaluation.print_table(result)
  print(json.dumps(result, indent=2))


if __name__ == '__main__':
  app.run(main)
