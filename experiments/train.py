"""Trains a language model from a config file: the thin entry point of moejax.train.

  python experiments/train.py --workdir=/tmp/moe_tiny           # the default config, moe_tiny
  python experiments/train.py --config=experiments/configs/moe_tiny.py:smoke --workdir=/tmp/smoke \
      --config.train.num_steps=40

Running again on the same workdir resumes from its latest checkpoint, with the run's own config
(workdir/config.json) when --config is not given; --config.x=y flags then change it (only changes
that fit the checkpoint are accepted; they are recorded in workdir/config_changes.jsonl). With
--config, the config is checked against the run. One trainer per workdir: a second one exits at
once naming the first one's pid and host. Multi-host: pass
--coordinator_address, --num_processes and --process_id, or launch under SLURM / with
JAX_COORDINATOR_ADDRESS set, and JAX finds the cluster itself.
"""
import os
import sys

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from moejax import checkpoint
from moejax import script
from moejax import train
from moejax import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'moe_tiny.py'),
    'Experiment config file (path[:arg]).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.',
                               required=True)
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Index of this process.')


def _launched_on_a_cluster() -> bool:
  """True under a multi-process launcher whose environment jax.distributed reads by itself."""
  if 'JAX_COORDINATOR_ADDRESS' in os.environ:
    return True
  return any(int(os.environ.get(var, '1')) > 1 for var in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'))


def main(argv):
  script.start(argv)
  if _COORDINATOR.value is not None or _NUM_PROCESSES.value is not None:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _launched_on_a_cluster():
    jax.distributed.initialize()
  workdir = _WORKDIR.value
  if not flags.FLAGS['config'].present and os.path.exists(
      os.path.join(workdir, workdir_lib.CONFIG_FILE)):
    config = workdir_lib.resumed_config(
        workdir, config_flags.get_override_values(flags.FLAGS['config']))
  else:
    config = _CONFIG.value
  try:
    train.train_and_evaluate(config, workdir)
  except (workdir_lib.WorkdirInUse, workdir_lib.IncompatibleWorkdir, checkpoint.SaveError,
          FloatingPointError) as error:
    # Faults of the run, not of moejax: one line, no traceback.
    sys.exit(f'train.py: {type(error).__name__}: {error}')


if __name__ == '__main__':
  app.run(main)
