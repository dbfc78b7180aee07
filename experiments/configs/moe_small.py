"""moe_small: a GPU-sized MoE LM (about 0.26B active / 0.88B total parameters) on one H100.

12 layers, d_model 1024, 16 heads; every FFN is an MoE of 8 SwiGLU experts of width 2816, top-2
(Mixtral-style routing), ragged dropless dispatch with the fastest grouped matmul ('auto': the
Hopper kernels on sm90); bf16 compute, float32 params, bf16 first moment. 2,000 steps of
16 x 1024 bytes (33M tokens) of the stdlib corpus.

Command:  python experiments/train.py --config=experiments/configs/moe_small.py --workdir=/tmp/moe_small
Hardware: 1x H100 80GB (any GPU count works: the batch is split over mesh.data = all devices).
Expected: not yet measured; the run logs MFU against the H100's 989 TFLOP/s bf16 peak, and its
          eval bits per byte should fall well below moe_tiny's (record the result here).
Smoke:    --config=experiments/configs/moe_small.py:smoke runs in seconds on CPU.
"""
import ml_collections

from moejax import config_files

common = config_files.load_module('common', next_to=__file__)


def get_config(arg=None):
  common.check_arg('moe_small', arg)
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict(dict(
      vocab_size=257,
      d_model=1024,
      num_layers=12,
      num_heads=16,
      d_ff=5632,                 # dense layers only (none here): top_k x expert d_ff
      max_seq_len=1024,
      rope_base=10_000.0,
      ffn='moe',
      moe_every=1,
      first_dense_layers=0,
      tie_embeddings=False,
      remat=False,               # recompute each block in the backward pass to save memory
      attention_impl='xla',      # 'xla' | 'cudnn' (fused flash attention; try it on the GPU)
  ))
  config.model.moe = ml_collections.ConfigDict(dict(
      num_experts=8,
      top_k=2,
      d_ff=2816,
      router='top_k',
      dispatch='ragged',
      capacity_factor=1.25,
      group_size=0,
      capacity_priority='position',
      num_shared_experts=0,
      normalize_top_k=True,
      num_expert_groups=1,
      top_groups=1,
      jitter_noise=0.0,
      activation='swiglu',
      gmm_impl='auto',
      aux_free_bias_rate=1e-3,
      router_dtype='float32',    # 'float32' | 'bfloat16': router logits, softmax and top-k
      load_balance_weight=1e-2,
      z_loss_weight=1e-3,
  ))

  config.data = ml_collections.ConfigDict(dict(
      corpus='stdlib',
      paths='',
      token_dtype='uint16',
      val_fraction=0.05,
      include='',                # stdlib/text domain: globs of relative paths, e.g. 'asyncio/**,email/**'
      # held out of training for post-hoc fits (greedy soup, stacked/gated fusion): this share of the
      # training files (stdlib/text), or of each file's training tokens, cut at an EOD (tokens)
      selection_fraction=0.0,
      seq_len=1024,
      batch_size=16,             # 64 x 1024 without remat overflowed an 80 GB H100
      eval_batch_size=16,
  ))

  config.train = ml_collections.ConfigDict(dict(
      num_steps=2000,
      log_every=20,
      eval_every=250,
      eval_steps=8,
      checkpoint_every=500,
      keep_checkpoints=2,
      max_nonfinite_steps=20,
      peak_flops=0.0,
      init_from='',              # a workdir whose params start this run (own optimizer, steps, data)
      distill_from='',           # a teacher workdir (model or ensemble): distil its next-token distribution
      distill_weight=0.5,        # loss = (1 - w) * data cross-entropy + w * KL(teacher || student)
  ))

  config.optim = ml_collections.ConfigDict(dict(
      learning_rate=6e-4,
      warmup_steps=200,
      end_lr_ratio=0.1,
      weight_decay=0.1,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      grad_clip=1.0,
  ))

  config.precision = ml_collections.ConfigDict(dict(
      policy='bf16',
      mu_dtype='',
      nu_dtype='',
      loss_scale_init=2.0**15,
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
    config.train.update(num_steps=10, log_every=5, eval_every=5, eval_steps=1,
                        checkpoint_every=5)
    config.optim.update(warmup_steps=2)
  return config
