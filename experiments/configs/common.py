"""Blocks every experiment config shares (big_vision's configs/common.py pattern).

Load it from a config file with `config_files.load_module('common', next_to=__file__)`: config
files are not a package.
"""
import ml_collections


def mesh() -> ml_collections.ConfigDict:
  """The `mesh` section: every device on the data axis, and the logical-to-mesh axis rules."""
  return ml_collections.ConfigDict(dict(
      data=-1, fsdp=1, expert=1, model=1,
      rules=(
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


def check_arg(config_name: str, arg: str | None, allowed=('smoke',)) -> None:
  """Raises ValueError for a config arg the config does not know (None and '' mean none)."""
  if arg and arg not in allowed:
    raise ValueError(f'{config_name}: unknown config arg {arg!r}; expected one of {allowed} '
                     'or nothing')
