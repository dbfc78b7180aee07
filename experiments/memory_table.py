"""Memory of one training step per precision preset: params, gradients, optimizer state, activations.

  python experiments/memory_table.py                                  # moe_tiny
  python experiments/memory_table.py --config_arg=smoke --policies=fp32,pure_bf16

For each preset it builds moe_tiny's train state abstractly (nothing is materialised), counts the
bytes of the params, of the gradients (the params' shapes and dtypes) and of the optimizer state,
and compiles the train step to read XLA's memory analysis: `temp` is what one step needs beyond
its arguments and outputs (activations kept for the backward pass, gradients, workspace). One
Markdown row per preset, sizes in MiB and bytes per parameter; --config.x=y style overrides are
not taken: use --d_model / --num_layers / --batch_size to change the size.
"""

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax import config_files
from moejax import memory
from moejax import model as model_lib
from moejax import precision
from moejax import script
from moejax import train

MIB = 2.0**20

_POLICIES = flags.DEFINE_list('policies', sorted(precision.POLICIES), 'Presets to tabulate.')
_CONFIG_ARG = flags.DEFINE_string('config_arg', '', "moe_tiny's config arg ('smoke').")
_D_MODEL = flags.DEFINE_integer('d_model', 0, 'model.d_model; 0 keeps the config\'s.')
_NUM_LAYERS = flags.DEFINE_integer('num_layers', 0, 'model.num_layers; 0 keeps the config\'s.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 0, 'data.batch_size; 0 keeps the config\'s.')


def preset_memory(config, policy: str) -> dict:
  """Bytes of params, grads, optimizer state and the compiled step's buffers under `policy`."""
  config = config.copy_and_resolve_references()
  config.precision.policy = policy
  model = model_lib.build_model(config.model, precision.get_policy(policy))
  tx, schedule = train.make_optimizer(config)
  state = nn.unbox(jax.eval_shape(train.make_init_fn(config, model, tx), jax.random.PRNGKey(0)))
  batch = jax.ShapeDtypeStruct((config.data.batch_size, config.data.seq_len + 1), jnp.int32)
  step = train.make_train_step(model, tx, schedule,
                               stochastic_rounding=config.precision.stochastic_rounding)
  compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
  acc = memory.state_accounting(state.params, state.opt_state, config.model)
  return dict(policy=policy, **acc, grads_bytes=memory.tree_bytes(state.params),
              **memory.compiled_memory(compiled))


def format_rows(rows: list[dict]) -> str:
  lines = ['| preset | params MiB | grads MiB | optimizer MiB | step temp MiB | B/param '
           '(params+grads+optimizer) |', '|---|---|---|---|---|---|']
  for r in rows:
    state = r['params_bytes'] + r['grads_bytes'] + r['opt_state_bytes']
    lines.append(f'| {r["policy"]} | {r["params_bytes"] / MIB:.2f} | {r["grads_bytes"] / MIB:.2f} '
                 f'| {r["opt_state_bytes"] / MIB:.2f} | {r["temp_bytes"] / MIB:.2f} | '
                 f'{state / r["num_params"]:.2f} |')
  return '\n'.join(lines)


def main(argv):
  script.start(argv)
  config = config_files.get_config('moe_tiny', _CONFIG_ARG.value or None)
  if _D_MODEL.value:
    config.model.d_model = _D_MODEL.value
  if _NUM_LAYERS.value:
    config.model.num_layers = _NUM_LAYERS.value
  if _BATCH_SIZE.value:
    config.data.batch_size = _BATCH_SIZE.value
  rows = [preset_memory(config, policy) for policy in _POLICIES.value]
  n = rows[0]['num_params']
  print(f'{n:,} parameters ({rows[0]["num_active_params"]:,} active per token), batch '
        f'{config.data.batch_size} x {config.data.seq_len} tokens')
  print(format_rows(rows))


if __name__ == '__main__':
  app.run(main)
