"""ensemble_tiny: a 4-member deep ensemble of moe_tiny models, fused by the linear pool.

Each member is moe_tiny (byte-level MoE LM on the embedded corpus) with its own initialisation
and data order; the four train in one jitted step, on the 'member' mesh axis when there are
devices for it. Other ways to build and fuse the members are flags on top:
  --config.ensemble.method=bagging            bootstrap resamples of the training documents
  --config.ensemble.method=boosting --config.ensemble.fusion=sum_logits   additive logit boosting
  --config.ensemble.method=boosting --config.ensemble.boosting=reweight   reweighted documents
  --config.ensemble.fusion=stacked|gated      fitted by evaluate.py on the selection split: the 2 %
                                              of training files (data.selection_fraction=0.02)
                                              that no member trains on
  --config.ensemble.method=e3 --config.ensemble.e3_layers=1 --config.model.moe.num_experts=8
                                              E3: one MoE whose last MoE layer gives each member
                                              its own 8 / M experts (docs/benchmarks.md)

Command:  python experiments/train.py --config=experiments/configs/ensemble_tiny.py --workdir=/tmp/ensemble_tiny
          python experiments/evaluate.py --workdir=/tmp/ensemble_tiny
Hardware: 2 CPU cores.
Expected: fused validation NLL below the best member's (see docs/benchmarks.md).
Measured: 2 CPU cores shared with other jobs, jax 0.10.2, 2026-12-02, this config at
          --config.data.batch_size=8 --config.train.num_steps=200 --config.optim.warmup_steps=20
          (8 min): fused NLL 1.845 (linear pool), 1.837 (log-linear), 1.836 (stacked) vs the
          best member's 1.871 nats per byte; ECE 0.055 (linear pool) vs the best member's 0.037:
          at this length the pool is less well calibrated than its members. The table, with
          gated fusion, bagging and both boostings: docs/benchmarks.md.
Smoke:    --config=experiments/configs/ensemble_tiny.py:smoke runs in seconds.
"""
from moejax import config_files

common = config_files.load_module('common', next_to=__file__)


def get_config(arg=None):
  common.check_arg('ensemble_tiny', arg)
  config = config_files.load_module('moe_tiny', next_to=__file__).get_config(arg)
  config.ensemble.update(size=4, method='deep', fusion='mean_prob')
  config.data.selection_fraction = 0.02  # the stacked and gated fusions are fitted on it
  if arg == 'smoke':
    config.ensemble.update(size=2, fit_batches=1, fit_steps=50)
  return config
