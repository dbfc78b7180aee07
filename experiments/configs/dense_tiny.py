"""dense_tiny: the dense baseline of moe_tiny, with the same active parameters per token.

Everything (data, steps, optimizer, precision) is moe_tiny's; only the FFN differs: a dense SwiGLU
of width d_ff = top_k x (moe_tiny's expert d_ff), so each token sees as many FFN weights as in
moe_tiny (which holds num_experts / top_k times more of them in total).

Command:  python experiments/train.py --config=experiments/configs/dense_tiny.py --workdir=/tmp/dense_tiny
Hardware: 2 CPU cores.
Expected: a higher eval loss than moe_tiny at the same step (fewer total parameters).
Measured: 2 CPU cores, jax 0.10.2, 2026-11-23: 600 steps in 7m10s wall, 6.2k tokens/s; eval bits
          per byte 1.765 @600 (eval loss 1.2233 nats) vs moe_tiny's 1.717 (1.719 with the
          capacity dispatch moe_tiny used then; the dense FFN does not depend on it).
Smoke:    --config=experiments/configs/dense_tiny.py:smoke runs in seconds.
"""
from moejax import config_files

common = config_files.load_module('common', next_to=__file__)


def get_config(arg=None):
  common.check_arg('dense_tiny', arg)
  config = config_files.load_module('moe_tiny', next_to=__file__).get_config(arg)
  config.model.ffn = 'dense'
  config.model.d_ff = config.model.moe.top_k * config.model.moe.d_ff
  return config
