"""experiments/evaluate.py and generate.py on one workdir, and on workdirs fused as an ensemble."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from moejax import evaluation
from moejax import train
from moejax import workdir as workdir_lib
from test_sharding import load_config
from test_train import REPO


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  config = load_config('moe_tiny', 'smoke')
  config.train.update(num_steps=4, log_every=2, eval_every=4, checkpoint_every=4)
  path = str(tmp_path_factory.mktemp('single') / 'run')
  train.train_and_evaluate(config, path)
  return path


def run_script(name, *flags):
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, os.path.join(REPO, 'experiments', name), *flags],
                        env=env, capture_output=True, text=True, timeout=300)


def test_single_model_gains_accuracy_and_ece(workdir):
  result = evaluation.evaluate([workdir])
  own = train.evaluate(workdir_lib.load_config(workdir), workdir)
  assert set(result) == set(own) | {'accuracy', 'ece'}
  assert result['eval_loss'] == own['eval_loss']
  assert 0 < result['accuracy'] < 1 and 0 <= result['ece'] < 1
  assert os.path.exists(os.path.join(workdir, evaluation.RELIABILITY_FILE))


def test_workdirs_w_w_report_ws_own_eval_loss(workdir, tmp_path):
  own = train.evaluate(workdir_lib.load_config(workdir), workdir)
  out = str(tmp_path / 'diagram.png')
  result = run_script('evaluate.py', f'--workdirs={workdir},{workdir}', f'--out={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout)
  assert set(report) == {'members', 'fused', 'disagreement', 'mutual_information', 'step'}
  assert report['fused']['eval_loss'] == pytest.approx(own['eval_loss'], rel=1e-5)
  assert report['fused']['fusion'] == 'mean_prob'
  for member in report['members']:
    assert set(member) >= {'eval_loss', 'eval_bits_per_byte', 'accuracy', 'ece'}
    assert member['eval_loss'] == pytest.approx(own['eval_loss'], rel=1e-5)
  assert report['disagreement'] == 0.0
  assert report['mutual_information'] == pytest.approx(0.0, abs=1e-5)
  assert 'fused' in result.stderr and 'member 1' in result.stderr  # the table
  assert os.path.exists(out)


def test_generate_past_max_seq_len_and_from_fused_workdirs(workdir):
  # The smoke model's max_seq_len is 32: 1 + 13 + 40 tokens need the sliding window.
  single = run_script('generate.py', f'--workdir={workdir}', '--prompt=def parse_args(',
                      '--num_tokens=40', '--temperature=0')
  assert single.returncode == 0, single.stderr[-3000:]
  text = json.loads(single.stdout)['text']
  assert text.startswith('def parse_args(') and len(text.encode()) > 13 + 20
  fused = run_script('generate.py', f'--workdirs={workdir},{workdir}', '--prompt=def parse_args(',
                     '--num_tokens=40', '--temperature=0')
  assert fused.returncode == 0, fused.stderr[-3000:]
  # Two identical members fuse to the member itself.
  assert json.loads(fused.stdout)['text'] == text


def recorded_with_selection_fraction(workdir, fraction, path):
  """A copy of `workdir` whose recorded config says it trained with data.selection_fraction=fraction
  (what the checks read; the parameters are the same)."""
  shutil.copytree(workdir, path)
  config_path = os.path.join(path, workdir_lib.CONFIG_FILE)
  with open(config_path) as f:
    config = json.load(f)
  config['data']['selection_fraction'] = fraction
  with open(config_path, 'w') as f:
    json.dump(config, f)
  return str(path)


@pytest.mark.parametrize('fusion', ['stacked', 'gated'])
def test_fitted_fusion_of_workdirs_needs_one_selection_fraction_above_zero(workdir, tmp_path, fusion):
  with pytest.raises(ValueError, match=rf'^data.selection_fraction=0.0: the {fusion} fusion reads the '
                                       r"selection split .* every workdir's members must have been trained"):
    evaluation.evaluate([workdir, workdir], fusion=fusion)
  held = recorded_with_selection_fraction(workdir, 0.1, tmp_path / 'held')
  with pytest.raises(ValueError, match=r'^data.selection_fraction=0.0 and 0.1: '):
    evaluation.evaluate([held, workdir], fusion=fusion)
  with pytest.raises(ValueError, match=r'^data.selection_fraction=0.0 and 0.1: '):
    evaluation.load_ensemble([held, workdir], fusion=fusion)
  other = recorded_with_selection_fraction(workdir, 0.1, tmp_path / 'other')
  report = evaluation.evaluate([held, other], fusion=fusion)
  assert report['fused']['fusion'] == fusion and len(report['members']) == 2


def test_include_scores_one_domain_of_a_run_with_a_selection_split(workdir, tmp_path):
  # asyncio holds no selection file at data.selection_fraction=0.05, and scoring its validation
  # files needs none: the selection split is only checked where a fit reads it.
  recorded = recorded_with_selection_fraction(workdir, 0.05, str(tmp_path / 'recorded'))
  config = workdir_lib.load_config(recorded)
  config.data.include = 'asyncio/**'
  own = train.evaluate(config, recorded)
  single = evaluation.evaluate([recorded], include='asyncio/**')
  assert single['eval_loss'] == own['eval_loss']
  assert evaluation.evaluate([recorded], include='email/**')['eval_loss'] != single['eval_loss']
  fused = evaluation.evaluate([recorded, recorded], include='asyncio/**')
  assert fused['fused']['eval_loss'] == pytest.approx(own['eval_loss'], rel=1e-5)
  with pytest.raises(ValueError, match='selection split holds 0 tokens'):
    evaluation.evaluate([recorded, recorded], fusion='stacked', include='asyncio/**')
