"""Times one ensemble train step against M steps of one member, in one run.

  python experiments/bench_ensemble.py --config=experiments/configs/ensemble_tiny.py --rounds=10

Builds the config's ensemble (ensemble.size = M) and the same model alone (ensemble.size = 1),
jits both train steps on the default device, and alternates timed rounds (one ensemble step, then
M single-model steps) so that both see the same machine load. Prints JSON: the median
`ensemble_step_s` and `member_step_s`, `ratio` = ensemble_step_s / (M · member_step_s) (1.0: one
vmapped step costs exactly M separate ones), `tokens_per_s` of each, and `state_bytes` (params
plus optimizer state) of each.
"""
import json
import statistics
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from moejax import data as data_lib
from moejax import ensemble
from moejax import objective as objective_lib
from moejax import precision
from moejax import script
from moejax import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'An ensemble experiment config.',
                                          lock_config=True)
_ROUNDS = flags.DEFINE_integer('rounds', 10, 'Timed rounds after one warm-up round.')


def _step_and_state(config):
  """(jitted train step, initial state) of `config` on the default device."""
  model = ensemble.build_model(config, precision.get_policy(config.precision.policy))
  tx, schedule = train.make_optimizer(config)
  objective = (ensemble.train_objective(config) if config.ensemble.size > 1
               else objective_lib.lm_objective)
  state = jax.jit(lambda rng: nn.unbox(train.make_init_fn(config, model, tx)(rng)))(
      jax.random.PRNGKey(config.seed))
  step = jax.jit(train.make_train_step(model, tx, schedule, objective), donate_argnums=0)
  return step, state


def _bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main(argv):
  script.start(argv)
  config = _CONFIG.value
  train.validate_config(config)
  size = config.ensemble.size
  if size < 2:
    raise app.UsageError(f'ensemble.size={size}: the benchmark compares an ensemble (>= 2)')
  if ensemble.is_e3(config):
    raise app.UsageError("ensemble.method='e3' has no member steps to time (its copies share one "
                         "model); compare the train loop's tokens_per_s and flops_per_token")
  single = config.copy_and_resolve_references()
  with single.unlocked():
    single.ensemble.size = 1
  ds = data_lib.make_dataset(config.data, config.seed, config.model.vocab_size)
  member_data = ensemble.make_data(config, ds)
  ensemble_step, ensemble_state = _step_and_state(config)
  member_step, member_state = _step_and_state(single)
  state_bytes = dict(ensemble=_bytes((ensemble_state.params, ensemble_state.opt_state)),
                     member=_bytes((member_state.params, member_state.opt_state)))

  times = dict(ensemble=[], member=[])
  for round_index in range(_ROUNDS.value + 1):
    batch = jnp.asarray(member_data.train_batch(round_index))
    start = time.perf_counter()
    ensemble_state, metrics = ensemble_step(ensemble_state, batch)
    jax.block_until_ready(metrics)
    ensemble_time = time.perf_counter() - start
    start = time.perf_counter()
    for m in range(size):
      member_state, metrics = member_step(member_state, batch[m])
    jax.block_until_ready(metrics)
    if round_index:  # the first round compiles
      times['ensemble'].append(ensemble_time)
      times['member'].append((time.perf_counter() - start) / size)

  tokens = config.data.batch_size * config.data.seq_len
  ensemble_s, member_s = (statistics.median(times[k]) for k in ('ensemble', 'member'))
  print(json.dumps(dict(
      members=size, rounds=_ROUNDS.value, device=jax.devices()[0].device_kind,
      ensemble_step_s=ensemble_s, member_step_s=member_s, ratio=ensemble_s / (size * member_s),
      tokens_per_s=dict(ensemble=size * tokens / ensemble_s, member=tokens / member_s),
      state_bytes=state_bytes), indent=2))


if __name__ == '__main__':
  app.run(main)
