"""moe_tiny: the CPU default, a byte-level MoE LM on the embedded corpus (Python stdlib source).

Command:  python experiments/train.py --config=experiments/configs/moe_tiny.py --workdir=/tmp/moe_tiny
Hardware: 2 CPU cores.
Expected: <= 2.5 bits per byte on the validation split within 10 minutes (see docs/benchmarks.md).
Measured: 2 CPU cores (one JAX device each), jax 0.10.2, 2026-12-03, a fresh clone and venv from
          the README's first command: 600 steps in 8m24s wall (9m15s with the install), 3.8k-6.8k
          tokens/s (the machine's speed drifted; 1.58x the tokens/s of 8dd0906, issue 16's
          baseline, in alternating runs); eval bits per byte 2.165 @200, 1.942 @300, 1.848 @400,
          1.752 @500, 1.708 @600 (eval loss 1.1838 nats), dropless. dense_tiny reached 1.765 at
          the same step (2026-11-23).
Smoke:    --config=experiments/configs/moe_tiny.py:smoke runs in seconds.
"""
import ml_collections

from moejax import config_files

common = config_files.load_module('common', next_to=__file__)


def get_config(arg=None):
  common.check_arg('moe_tiny', arg)
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict(dict(
      vocab_size=257,            # 256 bytes + end-of-document
      d_model=128,
      num_layers=4,
      num_heads=4,
      d_ff=512,                  # dense FFN width (dense layers and dense baselines)
      max_seq_len=128,
      rope_base=10_000.0,
      ffn='moe',                 # 'moe' | 'dense'
      moe_every=1,               # every n-th layer is MoE (counting after first_dense_layers)
      first_dense_layers=0,
      tie_embeddings=False,
      remat=False,               # recompute each block in the backward pass to save memory
      attention_impl='xla',      # 'xla' | 'cudnn' (NVIDIA GPUs: fused flash attention)
  ))
  config.model.moe = ml_collections.ConfigDict(dict(
      num_experts=8,
      top_k=2,
      d_ff=256,                  # per expert; top_k * d_ff == model.d_ff keeps active params equal
      router='top_k',            # 'top_k' | 'noisy_top_k' | 'expert_choice' | 'aux_free'
      # 'dense' | 'capacity' | 'ragged'. Ragged is dropless and strictly causal; on CPU its
      # grouped matmuls run as padded blocks ('auto' -> 'blocked'), about 20 % slower per step
      # than capacity 1.25, which drops ~5 % of slots and lets later tokens decide whether an
      # earlier token's second expert is dropped.
      dispatch='ragged',
      capacity_factor=1.25,
      group_size=0,              # capacity groups of this many tokens; 0 = one group per sequence
      # Which slots a full expert keeps: 'position' (earlier first; causal for top_k=1) or 'score'
      # (V-MoE batch priority: highest gate first; not causal).
      capacity_priority='position',
      num_shared_experts=0,
      normalize_top_k=True,
      num_expert_groups=1,       # group-limited routing (DeepSeek-V3): top_k experts within the
      top_groups=1,              # top_groups best of num_expert_groups groups; 1 / 1 = off
      jitter_noise=0.0,
      activation='swiglu',       # 'swiglu' | 'gelu'
      gmm_impl='auto',           # 'auto' | 'xla' | 'blocked' | 'hopper' | 'hopper_ws'
      aux_free_bias_rate=1e-3,
      router_dtype='float32',    # 'float32' | 'bfloat16': router logits, softmax and top-k
      load_balance_weight=1e-2,
      z_loss_weight=1e-3,
  ))

  config.data = ml_collections.ConfigDict(dict(
      corpus='stdlib',           # 'stdlib' | 'text' | 'tokens'
      paths='',                  # glob(s), comma separated, for 'text' and 'tokens'
      token_dtype='uint16',      # for 'tokens': 'uint16' | 'uint32'
      val_fraction=0.05,         # share of files (stdlib/text) or tokens (tokens) held out
      include='',                # stdlib/text domain: globs of relative paths, e.g. 'asyncio/**,email/**'
      # held out of training for post-hoc fits (greedy soup, stacked/gated fusion): this share of the
      # training files (stdlib/text), or of each file's training tokens, cut at an EOD (tokens)
      selection_fraction=0.0,
      seq_len=128,
      batch_size=32,             # global batch
      eval_batch_size=32,
  ))

  config.train = ml_collections.ConfigDict(dict(
      num_steps=600,
      log_every=25,
      eval_every=100,
      eval_steps=8,
      checkpoint_every=100,
      keep_checkpoints=3,
      max_nonfinite_steps=20,
      peak_flops=0.0,            # per device; 0 = look up the device table
      init_from='',              # a workdir whose params start this run (own optimizer, steps, data)
      distill_from='',           # a teacher workdir (model or ensemble): distil its next-token distribution
      distill_weight=0.5,        # loss = (1 - w) * data cross-entropy + w * KL(teacher || student)
  ))

  config.optim = ml_collections.ConfigDict(dict(
      learning_rate=3e-3,
      warmup_steps=50,
      end_lr_ratio=0.1,
      weight_decay=0.1,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      grad_clip=1.0,
  ))

  config.precision = ml_collections.ConfigDict(dict(
      policy='fp32',             # 'fp32' | 'bf16' | 'pure_bf16' | 'fp16'
      mu_dtype='',               # '' = the policy's choice
      nu_dtype='',
      loss_scale_init=2.0**15,   # fp16 only
      loss_scale_period=2000,
      stochastic_rounding=True,  # bf16/fp16 params only: unbiased rounding of every update
      int8_training=False,       # int8 quantisation-aware training of the expert matmuls
  ))

  config.ensemble = common.ensemble()
  config.mesh = common.mesh()

  if arg == 'smoke':
    config.model.update(d_model=32, num_layers=2, num_heads=2, d_ff=64, max_seq_len=32)
    config.model.moe.update(num_experts=4, top_k=2, d_ff=32)
    config.data.update(seq_len=32, batch_size=8, eval_batch_size=8)
    config.train.update(num_steps=20, log_every=5, eval_every=10, eval_steps=2,
                        checkpoint_every=10)
    config.optim.update(warmup_steps=2)
  return config
