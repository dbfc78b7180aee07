"""Samples text from the latest checkpoint of a training workdir.

  python experiments/generate.py --workdir=/tmp/moe_tiny --prompt='def main(' --num_tokens=100

Uses the run's own config (workdir/config.json) to rebuild the model; --temperature=0 is greedy.
"""
from absl import app
from absl import flags
from absl import logging

from moejax import generate
from moejax import model as model_lib
from moejax import precision
from moejax import workdir as workdir_lib

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir.', required=True)
_PROMPT = flags.DEFINE_string('prompt', '', 'Text to continue; empty starts a new document.')
_NUM_TOKENS = flags.DEFINE_integer('num_tokens', 100, 'Tokens (bytes) to sample.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'Softmax temperature; 0 is greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens; 0 = all.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax's INFO logs would drown the output
  config, params, model_state = workdir_lib.restore_params(_WORKDIR.value)
  model = model_lib.build_model(config.model, precision.get_policy(config.precision.policy))
  print(generate.sample_text(model, params, _PROMPT.value, _NUM_TOKENS.value, seed=_SEED.value,
                             temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                             router_state=model_state))


if __name__ == '__main__':
  app.run(main)
