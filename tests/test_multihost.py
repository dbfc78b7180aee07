"""Scale-out end to end: expert-parallel and two-process training match one device; checkpoints
restore onto another mesh bit for bit.

The one-device reference and the two processes (4 fake CPU devices each, gloo collectives) run
`experiments/train.py` in subprocesses, at the same time as the in-process 8-device run.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from moejax import checkpoint as checkpoint_lib
from moejax import model as model_lib
from moejax import precision
from moejax import sharding
from moejax import train
from moejax.moe import MoE

from test_sharding import load_config

REPO = pathlib.Path(__file__).resolve().parents[1]

STEPS = dict(num_steps=6, log_every=2, eval_every=6, checkpoint_every=6, eval_steps=1)
OVERRIDES = [f'--config.train.{key}={value}' for key, value in STEPS.items()]


def smoke_config(**mesh):
  config = load_config('moe_tiny', 'smoke')
  config.train.update(STEPS)
  config.mesh.update({**dict(data=1, fsdp=1, expert=1, model=1), **mesh})
  return config


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def launch(workdir: pathlib.Path, devices: int, *flags: str, log: str = 'log') -> subprocess.Popen:
  """experiments/train.py on the smoke config in a fresh process with `devices` CPU devices."""
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_NUM_CPU_DEVICES=str(devices),
             JAX_PLATFORMS='cpu')
  command = [sys.executable, str(REPO / 'experiments' / 'train.py'),
             f'--config={REPO / "experiments" / "configs" / "moe_tiny.py"}:smoke',
             f'--workdir={workdir}', *OVERRIDES, *flags]
  workdir.mkdir(parents=True, exist_ok=True)
  with open(workdir.parent / f'{workdir.name}.{log}', 'w') as out:
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait(process: subprocess.Popen, log: pathlib.Path):
  try:
    process.wait(timeout=240)
  except subprocess.TimeoutExpired:
    process.kill()
    raise
  assert process.returncode == 0, log.read_text()[-4000:]


def curve(workdir) -> dict[str, list[float]]:
  """Train losses at the logged steps and the eval losses, from metrics.jsonl."""
  lines = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  steps = [(line['step'], 'loss' in line) for line in lines]
  assert len(steps) == len(set(steps)), f'a step was logged twice (two writers?): {steps}'
  return dict(loss=[line['loss'] for line in lines if 'loss' in line],
              eval_loss=[line['eval_loss'] for line in lines if 'eval_loss' in line])


def abstract_state(config, mesh):
  """The TrainState's abstract tree with target shardings on `mesh`."""
  rules = sharding.logical_rules(config.mesh)
  model = model_lib.build_model(config.model, precision.get_policy(config.precision.policy))
  tx, _ = train.make_optimizer(config)
  init_fn = train.make_init_fn(config, model, tx)
  with sharding.mesh_context(mesh, rules):
    boxed = jax.eval_shape(init_fn, jax.random.PRNGKey(config.seed))
  return nn.unbox(sharding.abstract_with_shardings(boxed, mesh, rules))


def restore(directory, step, abstract):
  ckpt = checkpoint_lib.Checkpointer(directory, keep_best=False, async_save=False)
  try:
    return ckpt.restore(step, abstract)
  finally:
    ckpt.close()


def assert_bitwise_equal(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(jax.device_get(x)), np.asarray(jax.device_get(y)))


@pytest.mark.slow
def test_expert_parallel_and_two_processes_match_one_device(tmp_path):
  port = free_port()
  mesh_flags = ('--config.mesh.data=2', '--config.mesh.expert=4')
  reference = launch(tmp_path / 'one_device', 1)
  workers = [
      launch(tmp_path / 'two_processes', 4, *mesh_flags, f'--coordinator_address=localhost:{port}',
             '--num_processes=2', f'--process_id={i}', log=f'log{i}')
      for i in range(2)]

  in_process = tmp_path / 'eight_devices'
  train.train_and_evaluate(smoke_config(data=2, expert=4), str(in_process))

  wait(reference, tmp_path / 'one_device.log')
  for i, worker in enumerate(workers):
    wait(worker, tmp_path / f'two_processes.log{i}')

  expected = curve(tmp_path / 'one_device')
  assert len(expected['loss']) == 3 and len(expected['eval_loss']) == 1
  for workdir in (in_process, tmp_path / 'two_processes'):
    actual = curve(workdir)
    for key in ('loss', 'eval_loss'):
      np.testing.assert_allclose(actual[key], expected[key], rtol=2e-5, err_msg=f'{workdir} {key}')

  # The checkpoint both processes wrote together restores on one device, and onto the 8-device
  # expert-parallel mesh, with identical values.
  directory = tmp_path / 'two_processes' / 'checkpoints'
  expert_parallel = smoke_config(data=2, expert=4)
  on_mesh = abstract_state(expert_parallel, sharding.make_mesh(expert_parallel.mesh))
  one_device = smoke_config(data=1)
  on_one = abstract_state(one_device, sharding.make_mesh(one_device.mesh, jax.devices()[:1]))
  assert_bitwise_equal(restore(directory, 6, on_mesh), restore(directory, 6, on_one))


def moe_init(rng):
  """Boxed params of one MoE layer (E=4 experts) plus Adam moments: a small stand-in TrainState."""
  x = jax.numpy.zeros((2, 4, 8))
  params = MoE(num_experts=4, top_k=2, d_ff=16).init(rng, x)['params']
  return dict(params=params, opt_state=optax.adam(1e-3).init(params))


@pytest.mark.parametrize('source_mesh,source_devices,target_mesh,target_devices', [
    (dict(data=2, expert=4), 8, dict(data=1), 1),
    (dict(data=1), 1, dict(data=2, expert=4), 8),
], ids=['expert4_to_one_device', 'one_device_to_expert4'])
def test_reshard(tmp_path, source_mesh, source_devices, target_mesh, target_devices):
  """A checkpoint written on one mesh restores onto another with bitwise-equal values."""
  boxed = jax.eval_shape(moe_init, jax.random.key(0))
  rng = np.random.default_rng(0)  # random values in every leaf, without compiling an init
  values = jax.tree.map(lambda leaf: rng.standard_normal(leaf.shape).astype(leaf.dtype),
                        nn.unbox(boxed))
  source = smoke_config(**source_mesh).mesh
  mesh = sharding.make_mesh(source, jax.devices()[:source_devices])
  rules = sharding.logical_rules(source)
  state = jax.device_put(values, sharding.tree_shardings(boxed, mesh, rules))
  ckpt = checkpoint_lib.Checkpointer(tmp_path, keep_best=False, async_save=False)
  ckpt.save(3, state)
  ckpt.wait()
  ckpt.close()

  target = smoke_config(**target_mesh).mesh
  target_mesh = sharding.make_mesh(target, jax.devices()[:target_devices])
  abstract = nn.unbox(sharding.abstract_with_shardings(boxed, target_mesh, rules))
  restored = restore(tmp_path, 3, abstract)

  assert_bitwise_equal(restored, state)
  for tree in (restored['params'], restored['opt_state'][0].mu):
    wi_0 = tree['experts']['wi_0']
    assert wi_0.sharding == abstract['params']['experts']['wi_0'].sharding
    assert len(wi_0.sharding.device_set) == target_devices
    assert wi_0.addressable_shards[0].data.shape[0] == 4 // target.expert
