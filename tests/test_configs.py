"""Every experiment config loads, matches the moe_tiny schema and validates; bad input fails early."""
import os
import subprocess
import sys

from absl.testing import parameterized
import ml_collections

from moejax import config_files
from moejax import model as model_lib
from moejax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ('moe_tiny', 'dense_tiny', 'moe_small', 'ensemble_tiny')


def load(name, arg=None):
  return config_files.get_config(name, arg)


def flat_keys(config):
  return set(ml_collections.ConfigDict(config).to_dict().keys()) | {
      f'{section}.{key}' for section, value in config.items()
      if isinstance(value, ml_collections.ConfigDict) for key in flat_keys(value)}


def run_train_script(tmp_path, *flags):
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run(
      [sys.executable, os.path.join(REPO, 'experiments', 'train.py'),
       f'--workdir={tmp_path / "workdir"}', *flags],
      env=env, capture_output=True, text=True, timeout=120)


class ConfigsTest(parameterized.TestCase):

  @parameterized.product(name=CONFIGS, arg=(None, 'smoke'))
  def test_loads_with_the_schema_and_validates(self, name, arg):
    config = load(name, arg)
    self.assertIsInstance(config, ml_collections.ConfigDict)
    self.assertEqual(flat_keys(config), flat_keys(load('moe_tiny')))
    train.validate_config(config)

  @parameterized.parameters(*CONFIGS)
  def test_smoke_is_small(self, name):
    full, smoke = load(name), load(name, 'smoke')
    self.assertLessEqual(smoke.train.num_steps, 20)
    self.assertLess(model_lib.flops_per_token(smoke.model, smoke.data.seq_len),
                    model_lib.flops_per_token(full.model, full.data.seq_len))

  @parameterized.parameters(*CONFIGS)
  def test_unknown_arg_fails(self, name):
    with self.assertRaisesRegex(ValueError, 'unknown config arg'):
      load(name, 'smok')

  @parameterized.parameters(None, 'smoke')
  def test_dense_tiny_matches_moe_tiny_active_params_and_steps(self, arg):
    moe, dense = load('moe_tiny', arg), load('dense_tiny', arg)
    self.assertEqual(dense.model.ffn, 'dense')
    self.assertEqual(dense.model.d_ff, moe.model.moe.top_k * moe.model.moe.d_ff)
    self.assertEqual(dense.train.num_steps, moe.train.num_steps)
    router_flops = 6 * moe.model.num_layers * moe.model.d_model * moe.model.moe.num_experts
    self.assertEqual(model_lib.flops_per_token(dense.model, dense.data.seq_len) + router_flops,
                     model_lib.flops_per_token(moe.model, moe.data.seq_len))
    dense.model.ffn = 'moe'
    self.assertEqual(dense.to_dict(), moe.to_dict())


def test_typo_override_fails_before_compiling(tmp_path):
  result = run_train_script(tmp_path, '--config.train.num_stepz=3')
  assert result.returncode != 0
  assert 'num_stepz' in result.stderr and 'did you mean' in result.stderr.lower()
  assert not (tmp_path / 'workdir').exists()


def test_wrong_type_and_bad_value_fail_naming_the_key(tmp_path):
  result = run_train_script(tmp_path, '--config.train.num_steps=ten')
  assert result.returncode != 0 and 'train.num_steps' in result.stderr
  result = run_train_script(tmp_path, '--config.train.num_steps=0')
  assert result.returncode != 0 and 'train.num_steps=0' in result.stderr
  assert not (tmp_path / 'workdir' / 'checkpoints').exists()
