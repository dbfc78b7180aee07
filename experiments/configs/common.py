"""Blocks every experiment config shares (big_vision's configs/common.py pattern).

Load it from a config file with `config_files.load_module('common', next_to=__file__)`: config
files are not a package.
"""
import ml_collections


def mesh() -> ml_collections.ConfigDict:
  """The `mesh` section: every device on the data axis, and the logical-to-mesh axis rules."""
  return ml_collections.ConfigDict(dict(
      member=1, data=-1, fsdp=1, expert=1, model=1,
      rules=(
          ('member', 'member'),
          ('batch', ('data', 'fsdp', 'expert')),
          ('length', None),
          ('embed', 'fsdp'),
          ('mlp', 'model'),
          ('heads', 'model'),
          ('kv', None),
          ('vocab', 'model'),
          ('expert', 'expert'),
      ),
  ))


def ensemble() -> ml_collections.ConfigDict:
  """The `ensemble` section (moejax.ensemble): size 1 is a single model."""
  return ml_collections.ConfigDict(dict(
      size=1,                    # M members
      method='deep',             # 'deep' | 'bagging' | 'boosting' | 'e3'
      # 'e3' (efficient ensemble of experts): the last e3_layers MoE layers split their experts
      # into `size` groups, one per copy of the tiled hidden state; 0 for the other methods.
      e3_layers=0,
      boosting='additive',       # 'additive' (logits, needs fusion 'sum_logits') | 'reweight'
      # 'mean_prob' | 'mean_logprob' | 'weighted' | 'stacked' | 'gated' | 'sum_logits'
      fusion='mean_prob',
      weights=(),                # 'weighted': one non-negative weight per member
      # 'stacked' | 'gated' are fitted after training on the selection split: data.selection_fraction > 0
      fit_batches=4,             # eval-sized batches of the selection split that the fit reads
      fit_steps=200,             # full-batch Adam steps of the stacked/gated fit
      fit_learning_rate=0.05,
  ))


def check_arg(config_name: str, arg: str | None, allowed=('smoke',)) -> None:
  """Raises ValueError for a config arg the config does not know (None and '' mean none)."""
  if arg and arg not in allowed:
    raise ValueError(f'{config_name}: unknown config arg {arg!r}; expected one of {allowed} '
                     'or nothing')
