"""Samples text from the latest checkpoint of a training workdir, or from several fused.

  python experiments/generate.py --workdir=/tmp/moe_tiny --prompt='def main(' --num_tokens=100
  python experiments/generate.py --workdirs=/tmp/a,/tmp/b --fusion=mean_prob --prompt='def main('

Uses the run's own config (workdir/config.json) to rebuild the model; --temperature=0 is greedy.
An ensemble workdir, or several workdirs of one architecture, sample from the members' fused
distribution (one KV cache per member). Past model.max_seq_len the model attends over a sliding
window of the last max_seq_len tokens. Prints JSON: the `text`, the compute `precision`
(--precision, default the run's own), the `quantize` mode (--quantize=int8: routed expert weights
stored int8; single models) and `expert_weight_bytes`.
"""
import json

from absl import app
from absl import flags

from moejax import evaluation
from moejax import generate
from moejax import memory
from moejax import script

_FLAGS = evaluation.define_inference_flags('Training workdirs to sample from as an ensemble.')
flags.adopt_module_key_flags(evaluation)  # --helpshort lists them
_PROMPT = flags.DEFINE_string('prompt', '', 'Text to continue; empty starts a new document.')
_NUM_TOKENS = flags.DEFINE_integer('num_tokens', 100, 'Tokens (bytes) to sample.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'Softmax temperature; 0 is greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens; 0 = all.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')


def main(argv):
  script.start(argv)
  decoder = evaluation.load_ensemble(**_FLAGS.load_args())
  params = decoder.variables['params']
  text = generate.sample_text(decoder.model, params, _PROMPT.value, _NUM_TOKENS.value,
                              seed=_SEED.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                              router_state=decoder.variables.get('router_state'), **decoder.fusion)
  print(json.dumps(dict(text=text, precision=decoder.precision, quantize=_FLAGS.quantize.value,
                        expert_weight_bytes=memory.expert_weight_bytes(params)), indent=2))


if __name__ == '__main__':
  app.run(main)
