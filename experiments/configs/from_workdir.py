"""from_workdir: the config a workdir was trained with (its config.json), to override with flags.

Command:  python experiments/merge.py --method=upcycle --sources=/tmp/dense_tiny --workdir=/tmp/up \
              --config=experiments/configs/from_workdir.py:/tmp/dense_tiny --config.train.num_steps=200
Hardware: whatever the workdir's run needs.
Expected: the workdir's own config, so a merged or continued run changes only what the flags say.
Smoke:    the arg is the workdir; there is no separate smoke variant (pass a smoke workdir).
"""
from moejax import workdir


def get_config(arg=None):
  if not arg:
    raise ValueError('from_workdir: give the workdir as the config arg, '
                     '--config=experiments/configs/from_workdir.py:/path/to/workdir')
  return workdir.load_config(arg)
