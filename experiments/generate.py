"""Samples text from the latest checkpoint of a training workdir.

  python experiments/generate.py --workdir=/tmp/moe_tiny --prompt='def main(' --num_tokens=100

Uses the run's own config (workdir/config.json) to rebuild the model; --temperature=0 is greedy.
Prints JSON: the `text`, the compute `precision` (--precision, default the run's own), the
`quantize` mode (--quantize=int8: routed expert weights stored int8) and `expert_weight_bytes`.
"""
import json

from absl import app
from absl import flags
from absl import logging

from moejax import generate
from moejax import int8
from moejax import memory
from moejax import model as model_lib
from moejax import precision
from moejax import workdir as workdir_lib

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir.', required=True)
_PROMPT = flags.DEFINE_string('prompt', '', 'Text to continue; empty starts a new document.')
_NUM_TOKENS = flags.DEFINE_integer('num_tokens', 100, 'Tokens (bytes) to sample.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'Softmax temperature; 0 is greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens; 0 = all.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
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
  config, params, model_state = workdir_lib.restore_params(_WORKDIR.value)
  name, policy = precision.inference_policy(config.precision.policy, _PRECISION.value or '')
  quantize = _QUANTIZE.value == 'int8'
  model = model_lib.build_model(config.model, policy, 'int8' if quantize else '')
  if quantize:
    params = int8.quantize_expert_params(params)
  text = generate.sample_text(model, params, _PROMPT.value, _NUM_TOKENS.value, seed=_SEED.value,
                              temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                              router_state=model_state)
  print(json.dumps(dict(text=text, precision=name, quantize=_QUANTIZE.value,
                        expert_weight_bytes=memory.expert_weight_bytes(params)), indent=2))


if __name__ == '__main__':
  app.run(main)
