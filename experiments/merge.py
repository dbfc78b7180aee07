"""Merges trained workdirs into a new step-0 workdir: sparse upcycling, BTX or model soups.

  python experiments/merge.py --method=upcycle --sources=/tmp/dense_tiny --workdir=/tmp/upcycled
  python experiments/merge.py --method=btx --sources=/tmp/branch_a,/tmp/branch_b --workdir=/tmp/btx
  python experiments/merge.py --method=greedy_soup --sources=/tmp/s0,/tmp/s1,/tmp/s2 --workdir=/tmp/gs

Reads the sources' latest parameters (not their optimizer state), prints which parameters were
copied, averaged or created, and writes --workdir with its config.json and a step-0 checkpoint:
`train.py --workdir=OUT` trains on (fresh optimizer, the config's warmup), evaluate.py scores it,
generate.py samples it. The config is the first source's, adapted by the method (see
moejax.merge.target_config); `--config.x=y` flags change more, and `--config=FILE[:ARG]` starts
from another config file instead.
Sources that do not fit each other or the config are refused with one line naming the field.
"""
import argparse
import os

from absl import app
from absl import flags
from ml_collections import config_flags

from moejax import merge
from moejax import script

FROM_WORKDIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs',
                            'from_workdir.py')

_METHOD = flags.DEFINE_enum('method', None, merge.METHODS, 'How to merge the sources.',
                            required=True)
_SOURCES = flags.DEFINE_list('sources', None, 'Comma-separated source workdirs.', required=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The new workdir to write.', required=True)
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config of the merged model (path[:arg]); default: the first source\'s '
    '(configs/from_workdir.py:W1), so that --config.x=y works without it.',
    lock_config=True)
_NOISE = flags.DEFINE_float('upcycle_noise', 0.0, 'upcycle: Gaussian noise on each expert copy, '
                            'in units of the weight\'s std (0 keeps the function exactly).')


def main(argv):
  script.start(argv)
  try:
    lines = merge.merge_workdirs(_METHOD.value, _SOURCES.value, _WORKDIR.value, _CONFIG.value,
                                 noise_scale=_NOISE.value)
  except ValueError as e:
    raise SystemExit(f'merge: {e}') from None
  print('\n'.join(lines))


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with --config defaulting to the first source's config.json: the
  --config.x=y overrides exist only once --config names a file."""
  if not any(arg.split('=')[0] in ('--config', '-config') for arg in argv[1:]):
    sources_flag = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    sources_flag.add_argument('--sources', '-sources', default='')
    sources = sources_flag.parse_known_args(argv[1:])[0].sources.split(',')[0]
    if sources:
      argv = [argv[0], f'--config={FROM_WORKDIR}:{sources}', *argv[1:]]
  return app.parse_flags_with_usage(argv)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
