"""Counts what expert parallelism's all_to_all carries, with and without group-limited routing.

  python experiments/bench_all_to_all.py              # E=64, k=8, 8 devices, 4096 tokens; seconds

Tokens x [T, D] ~ N(0, 1) are routed by a TopKRouter as initialised (random kernel, so loads are
near balanced). The E experts form one group per device, in expert_parallel's layout, and the
run sweeps top_groups (DeepSeek-V3 node-limited routing; top_groups = devices is plain top-k).
Per token it reports the slots that leave the token's device (the rows moejax's all_to_all
carries), the distinct other devices reached (the rows of an all_to_all that sends a token once
per device, as DeepSeek-V3 does), the most devices any token reaches, and those rows in bytes at
--bytes_per_element. The last column is what moejax's ragged all_to_all actually moves per device
and direction: fixed blocks of R = T_l · min(k, E_l) rows per device pair, whatever the routing.
"""
from absl import app
from absl import flags
import jax
import numpy as np

from moejax import expert_parallel
from moejax import routing
from moejax import script

_TOKENS = flags.DEFINE_integer('tokens', 4096, 'T, all devices together.')
_D_MODEL = flags.DEFINE_integer('d_model', 512, 'D.')
_NUM_EXPERTS = flags.DEFINE_integer('num_experts', 64, 'E.')
_TOP_K = flags.DEFINE_integer('top_k', 8, 'k.')
_DEVICES = flags.DEFINE_integer('devices', 8, 'Size of the expert axis; one expert group each.')
_TOP_GROUPS = flags.DEFINE_list('top_groups', ['8', '4', '2', '1'], 'Values to sweep.')
_BYTES = flags.DEFINE_integer('bytes_per_element', 2, '2 for bfloat16 activations.')


def main(argv):
  script.start(argv)
  t, d, e, k, n = (_TOKENS.value, _D_MODEL.value, _NUM_EXPERTS.value, _TOP_K.value,
                   _DEVICES.value)
  x = np.random.default_rng(0).standard_normal((t, d)).astype(np.float32)
  static_rows = n * (t // n) * min(k, e // n)
  print(f'T={t} D={d} E={e} k={k} devices={n} (one expert group of {e // n} per device)')
  print('top_groups | remote slots/token | remote devices/token | max devices | '
        'dedup bytes/token | ragged a2a bytes/device (static)')
  for top_groups in (int(v) for v in _TOP_GROUPS.value):
    router = routing.TopKRouter(e, k, num_expert_groups=n, top_groups=top_groups)
    variables = router.init(jax.random.key(0), x)
    index = jax.jit(router.apply)(variables, x).expert_index
    traffic = jax.jit(expert_parallel.slot_traffic, static_argnums=(1, 2))(index, e, n)
    slots, copies = int(traffic['remote_slots']) / t, int(traffic['remote_copies']) / t
    print(f'{top_groups:10d} | {slots:18.2f} | {copies:20.2f} | {int(traffic["max_devices"]):11d}'
          f' | {copies * d * _BYTES.value:17.0f} | {static_rows * d * _BYTES.value:d}')


if __name__ == '__main__':
  app.run(main)
