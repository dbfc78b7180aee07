"""Precision study: moe_tiny under each precision choice, one table of what each costs and gives.

  python experiments/precision_study.py --workdir=/tmp/precision_study --num_steps=120

Trains experiments/configs/moe_tiny.py once per variant (same seed, data and schedule, shortened
to --num_steps) and prints one Markdown table: final eval loss, bits per byte, train tokens/s
(the last logged interval), and bytes per parameter of the params and of the optimizer state (from
each run's first metrics.jsonl line). Variants:
  fp32            float32 everywhere
  bf16            bf16 compute, float32 params (bf16 first moment)
  pure_bf16_rtn   bf16 params and moments, updates rounded to nearest
  pure_bf16_sr    bf16 params and moments, stochastic rounding (Zamirai et al. 2020)
  fp16            fp16 compute with dynamic loss scaling
  int8_qat        fp32 with int8 quantisation-aware training of the expert matmuls
  bf16_router     bf16, and the router's matmul and softmax in bf16 too (model.moe.router_dtype)
Each variant trains in its own workdir under --workdir (an existing one resumes).
"""
import json
import os

from absl import app
from absl import flags

from moejax import config_files
from moejax import metrics as metrics_lib
from moejax import script
from moejax import train

VARIANTS = {
    'fp32': {'precision.policy': 'fp32'},
    'bf16': {'precision.policy': 'bf16'},
    'pure_bf16_rtn': {'precision.policy': 'pure_bf16', 'precision.stochastic_rounding': False},
    'pure_bf16_sr': {'precision.policy': 'pure_bf16', 'precision.stochastic_rounding': True},
    'fp16': {'precision.policy': 'fp16'},
    'int8_qat': {'precision.policy': 'fp32', 'precision.int8_training': True},
    'bf16_router': {'precision.policy': 'bf16', 'model.moe.router_dtype': 'bfloat16'},
}

_WORKDIR = flags.DEFINE_string('workdir', None, 'Root of the per-variant workdirs.', required=True)
_NUM_STEPS = flags.DEFINE_integer('num_steps', 120, 'Training steps of every variant.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 0, 'Global batch; 0 keeps the config\'s.')
_VARIANTS = flags.DEFINE_list('variants', list(VARIANTS), f'Subset of {list(VARIANTS)}.')
_CONFIG_ARG = flags.DEFINE_string('config_arg', '', "moe_tiny's config arg ('smoke' for tests).")
_ROWS_JSON = flags.DEFINE_string('rows_json', '', 'Also write the rows as JSON here.')


def variant_config(name: str, num_steps: int, batch_size: int = 0, arg: str = ''):
  """moe_tiny with the variant's overrides, shortened to num_steps (warmup a tenth of them)."""
  if name not in VARIANTS:
    raise ValueError(f'variant {name!r}; allowed values: {list(VARIANTS)}')
  config = config_files.get_config('moe_tiny', arg or None)
  for dotted, value in VARIANTS[name].items():
    section, _, key = dotted.rpartition('.')
    node = config
    for part in section.split('.'):
      node = node[part]
    node[key] = value
  config.train.update(num_steps=num_steps, eval_every=num_steps, checkpoint_every=num_steps,
                      log_every=max(1, min(config.train.log_every, num_steps // 4)))
  config.optim.warmup_steps = min(config.optim.warmup_steps, num_steps // 10)
  if batch_size:
    config.data.update(batch_size=batch_size, eval_batch_size=batch_size)
  return config


def run_variant(name: str, workdir: str, num_steps: int, batch_size: int = 0, arg: str = ''
                ) -> dict:
  """Trains one variant; returns its table row."""
  final = train.train_and_evaluate(variant_config(name, num_steps, batch_size, arg), workdir)
  first = metrics_lib.read_metrics(workdir)[0]
  n = first['num_params']
  return dict(variant=name, eval_loss=final['eval_loss'],
              eval_bits_per_byte=final['eval_bits_per_byte'],
              tokens_per_s=final.get('tokens_per_s', float('nan')),
              skipped_steps=final.get('skipped_steps', 0.0),
              params_bytes_per_param=first['params_bytes'] / n,
              opt_state_bytes_per_param=first['opt_state_bytes'] / n)


def format_table(rows: list[dict]) -> str:
  """The rows as a Markdown table, with each eval loss relative to the fp32 row when present."""
  reference = {r['variant']: r['eval_loss'] for r in rows}.get('fp32')
  lines = ['| variant | eval loss | vs fp32 | bits/byte | tokens/s | skipped | B/param params '
           '| B/param optimizer |', '|---|---|---|---|---|---|---|---|']
  for r in rows:
    rel = f'{100 * (r["eval_loss"] / reference - 1):+.2f} %' if reference else 'n/a'
    lines.append(f'| {r["variant"]} | {r["eval_loss"]:.4f} | {rel} | '
                 f'{r["eval_bits_per_byte"]:.3f} | {r["tokens_per_s"]:,.0f} | '
                 f'{r["skipped_steps"]:.0f} | {r["params_bytes_per_param"]:.2f} | '
                 f'{r["opt_state_bytes_per_param"]:.2f} |')
  return '\n'.join(lines)


def main(argv):
  script.start(argv)
  rows = []
  for name in _VARIANTS.value:
    rows.append(run_variant(name, os.path.join(_WORKDIR.value, name), _NUM_STEPS.value,
                            _BATCH_SIZE.value, _CONFIG_ARG.value))
    print(format_table(rows[-1:]).splitlines()[-1], flush=True)
  print(format_table(rows))
  if _ROWS_JSON.value:
    with open(_ROWS_JSON.value, 'w') as f:
      json.dump(rows, f, indent=2)


if __name__ == '__main__':
  app.run(main)
