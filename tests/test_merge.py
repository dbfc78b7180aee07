"""Tests for moejax/merge.py: upcycling, BTX and soups on parameter trees and on workdirs.

Models are the moe_tiny / dense_tiny smoke configs (D=32, 2 layers, S=32); workdir tests train
their sources for a few steps.
"""
import os
import subprocess
import sys

from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import config_files
from moejax import merge
from moejax import model as model_lib
from moejax import precision
from moejax import train
from moejax import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg='smoke'):
  return config_files.get_config(name, arg)


def init_params(config, seed):
  model = model_lib.build_model(config.model, precision.get_policy('fp32'))
  tokens = jnp.zeros((1, config.data.seq_len), jnp.int32)
  return model, nn.unbox(model.init(jax.random.PRNGKey(seed), tokens))['params']


def upcycle_target(dense_config, num_experts=4, top_k=2):
  config, _ = merge.target_config('upcycle', [dense_config])
  config.model.moe.update(num_experts=num_experts, top_k=top_k)
  return config


def tokens_of(config, seed=0):
  return jax.random.randint(jax.random.PRNGKey(seed), (2, config.data.seq_len), 0, 257)


class UpcycleTest(parameterized.TestCase):

  @parameterized.parameters(('ragged', 2), ('dense', 2), ('ragged', 1), ('capacity', 3))
  def test_upcycled_model_computes_the_dense_function(self, dispatch, top_k):
    dense_config = load_config('dense_tiny')
    dense_model, dense_params = init_params(dense_config, 0)
    config = upcycle_target(dense_config, top_k=top_k)
    config.model.moe.update(dispatch=dispatch, capacity_factor=4.0)  # 4.0: nothing dropped
    model, fresh = init_params(config, 1)
    params, actions = merge.upcycle(dense_params, fresh, config.model)
    tokens = tokens_of(config)
    want, _ = dense_model.apply({'params': dense_params}, tokens)
    got, aux = model.apply({'params': params}, tokens)
    self.assertEqual(float(aux['dropped_fraction']), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The router is new; every expert is the dense FFN.
    np.testing.assert_array_equal(params['layer_0']['ffn']['router']['kernel'],
                                  fresh['layer_0']['ffn']['router']['kernel'])
    for e in range(4):
      np.testing.assert_array_equal(params['layer_1']['ffn']['experts']['wo'][e],
                                    dense_params['layer_1']['ffn']['mlp']['wo'])
    kinds = {a.path: a.kind for a in actions}
    self.assertEqual(kinds['layer_0/ffn/router/kernel'], 'created')
    self.assertEqual(kinds['layer_0/ffn/experts/wi_0'], 'copied')
    self.assertEqual(kinds['embedding'], 'copied')

  def test_noise_breaks_the_symmetry_only_when_asked(self):
    dense_config = load_config('dense_tiny')
    _, dense_params = init_params(dense_config, 0)
    config = upcycle_target(dense_config)
    _, fresh = init_params(config, 1)
    noisy, _ = merge.upcycle(dense_params, fresh, config.model, noise_scale=0.01,
                             rng=jax.random.PRNGKey(3))
    wi_0 = noisy['layer_0']['ffn']['experts']['wi_0']
    dense_wi_0 = dense_params['layer_0']['ffn']['mlp']['wi_0']
    self.assertFalse(np.array_equal(wi_0[0], wi_0[1]))
    relative = float(jnp.std(wi_0[0] - dense_wi_0) / jnp.std(dense_wi_0))
    self.assertBetween(relative, 0.005, 0.02)
    with self.assertRaisesRegex(ValueError, 'noise_scale'):
      merge.upcycle(dense_params, fresh, config.model, noise_scale=-1.0)

  def test_expert_width_must_be_the_dense_width(self):
    dense_config = load_config('dense_tiny')
    _, dense_params = init_params(dense_config, 0)
    config = upcycle_target(dense_config)
    config.model.moe.d_ff = 16
    _, fresh = init_params(config, 1)
    with self.assertRaisesRegex(ValueError, r'layer_0/ffn/experts/wi_0: .*shape'):
      merge.upcycle(dense_params, fresh, config.model)

  def test_dense_layers_of_the_target_keep_the_dense_ffn(self):
    dense_config = load_config('dense_tiny')
    _, dense_params = init_params(dense_config, 0)
    config = upcycle_target(dense_config)
    config.model.first_dense_layers = 1
    _, fresh = init_params(config, 1)
    params, _ = merge.upcycle(dense_params, fresh, config.model)
    chex.assert_trees_all_equal(params['layer_0'], dense_params['layer_0'])
    self.assertIn('experts', params['layer_1']['ffn'])


class BTXTest(parameterized.TestCase):

  def test_expert_e_is_branch_e_and_the_rest_is_the_mean(self):
    dense_config = load_config('dense_tiny')
    branches = [init_params(dense_config, seed)[1] for seed in range(3)]
    config, _ = merge.target_config('btx', [dense_config] * 3)
    self.assertEqual(config.model.moe.num_experts, 3)
    _, fresh = init_params(config, 7)
    params, actions = merge.btx(branches, fresh, config.model)
    for layer in ('layer_0', 'layer_1'):
      for w in merge.FFN_WEIGHTS:
        for e in range(3):
          np.testing.assert_array_equal(params[layer]['ffn']['experts'][w][e],
                                        branches[e][layer]['ffn']['mlp'][w])
      np.testing.assert_array_equal(params[layer]['ffn']['router']['kernel'],
                                    fresh[layer]['ffn']['router']['kernel'])
    mean = lambda *xs: sum(xs) / len(xs)
    np.testing.assert_allclose(params['embedding'], mean(*[b['embedding'] for b in branches]),
                               rtol=1e-6)
    np.testing.assert_allclose(params['layer_1']['attn']['query'],
                               mean(*[b['layer_1']['attn']['query'] for b in branches]),
                               rtol=1e-6, atol=1e-7)
    self.assertEqual({a.kind for a in actions}, {'copied', 'averaged', 'created'})

  def test_one_expert_per_branch(self):
    dense_config = load_config('dense_tiny')
    branches = [init_params(dense_config, seed)[1] for seed in range(2)]
    config, _ = merge.target_config('btx', [dense_config] * 2)
    config.model.moe.num_experts = 4
    _, fresh = init_params(config, 7)
    with self.assertRaisesRegex(ValueError, r'num_experts=4.*\(2\)'):
      merge.btx(branches, fresh, config.model)


class SoupTest(parameterized.TestCase):

  def test_soup_of_one_is_that_ingredient(self):
    _, params = init_params(load_config('moe_tiny'), 0)
    chex.assert_trees_all_equal(merge.uniform_soup([params]), params)
    soup = merge.greedy_soup([params], lambda p: 1.0)
    chex.assert_trees_all_equal(soup.params, params)
    self.assertEqual(soup.kept, [0])

  def test_uniform_soup_is_the_mean(self):
    trees = [{'w': jnp.full((2,), float(i)), 'b': jnp.full((3,), 2.0 * i, jnp.bfloat16)}
             for i in range(3)]
    soup = merge.uniform_soup(trees)
    np.testing.assert_array_equal(soup['w'], [1.0, 1.0])
    self.assertEqual(soup['b'].dtype, jnp.bfloat16)
    with self.assertRaisesRegex(ValueError, 'shapes'):
      merge.uniform_soup([{'w': jnp.zeros(2)}, {'w': jnp.zeros(3)}])

  def test_greedy_soup_keeps_only_improvements_and_never_loses_to_its_best_ingredient(self):
    # Held-out loss |mean(w) - 1|: ingredients 0.9 and 1.1 average to the optimum; 5.0 would spoil
    # any soup, and 1.5 on its own ties the worse of the first two.
    trees = [{'w': jnp.array([v])} for v in (5.0, 1.1, 0.9, 1.5)]
    loss = lambda p: float(jnp.abs(p['w'][0] - 1.0))
    soup = merge.greedy_soup(trees, loss)
    self.assertEqual(soup.order[0], 1)  # 1.1 and 0.9 tie; the sort is stable
    self.assertEqual(sorted(soup.kept), [1, 2])
    self.assertLessEqual(soup.loss, min(soup.ingredient_losses))
    self.assertAlmostEqual(soup.loss, loss(soup.params))
    np.testing.assert_allclose(soup.params['w'], [1.0], rtol=1e-6)


def test_check_fit_names_the_field_and_both_sources():
  a, b = load_config('moe_tiny'), load_config('moe_tiny')
  b.model.num_heads = 1
  with pytest.raises(ValueError, match=r'^model.num_heads: 2 \(A\) vs 1 \(B\);'):
    merge.check_fit([a.model, b.model], ['A', 'B'])
  merge.check_fit([a.model, a.model], ['A', 'A'])


def short_run(config, workdir, steps=2, **data):
  config.train.update(num_steps=steps, log_every=steps, eval_every=steps, checkpoint_every=steps)
  config.optim.warmup_steps = min(1, steps - 1)
  config.data.update(data)
  return train.train_and_evaluate(config, workdir)


@pytest.mark.slow
def test_upcycled_workdir_evaluates_like_the_dense_one_and_btx_trains(tmp_path):
  dense_a, dense_b = str(tmp_path / 'dense_a'), str(tmp_path / 'dense_b')
  short_run(load_config('dense_tiny'), dense_a, include='asyncio/**')
  config = load_config('dense_tiny')
  config.train.init_from = dense_a
  short_run(config, dense_b, include='email/**')

  upcycled = str(tmp_path / 'upcycled')
  lines = merge.merge_workdirs('upcycle', [dense_a], upcycled)
  assert 'set model.ffn' in lines[0] and 'wrote' in lines[-1]
  dense_eval = train.evaluate(workdir_lib.load_config(dense_a), dense_a)
  up_config = workdir_lib.load_config(upcycled)
  assert up_config.model.moe.d_ff == up_config.model.d_ff and up_config.train.init_from == ''
  up_eval = train.evaluate(up_config, upcycled)
  assert up_eval['step'] == 0
  np.testing.assert_allclose(up_eval['eval_loss'], dense_eval['eval_loss'], rtol=1e-5)

  btx_dir = str(tmp_path / 'btx')
  merge.merge_workdirs('btx', [dense_a, dense_b], btx_dir)
  btx_config = workdir_lib.load_config(btx_dir)
  assert btx_config.data.include == 'asyncio/**,email/**'
  _, params, _ = workdir_lib.restore_params(btx_dir)
  for e, branch in enumerate((dense_a, dense_b)):
    _, branch_params, _ = workdir_lib.restore_params(branch)
    np.testing.assert_array_equal(params['layer_1']['ffn']['experts']['wi_1'][e],
                                  branch_params['layer_1']['ffn']['mlp']['wi_1'])
  assert np.isfinite(train.evaluate(btx_config, btx_dir)['eval_loss'])
  btx_config.train.update(num_steps=3, log_every=1)
  result = train.train_and_evaluate(btx_config, btx_dir)
  assert result['step'] == 3 and np.isfinite(result['loss'])


@pytest.mark.slow
def test_greedy_soup_workdir_selects_on_held_out_training_files(tmp_path):
  sources = []
  for i, steps in enumerate((2, 4)):
    config = load_config('moe_tiny')
    config.seed = 0  # one shared initialisation
    sources.append(str(tmp_path / f'ingredient_{i}'))
    short_run(config, sources[-1], steps=steps, selection_fraction=0.1)
  soup_dir = str(tmp_path / 'soup')
  lines = merge.merge_workdirs('greedy_soup', sources, soup_dir)
  losses = [float(line.split()[2]) for line in lines if line.startswith('selection loss')]
  soup_loss = float(next(l for l in lines if l.startswith('greedy soup')).split()[-1])
  assert len(losses) == 2 and soup_loss <= min(losses)
  assert train.evaluate(workdir_lib.load_config(soup_dir), soup_dir)['step'] == 0
  # Ingredients trained without a selection split are refused.
  plain = str(tmp_path / 'plain')
  short_run(load_config('moe_tiny'), plain, steps=1)
  with pytest.raises(ValueError, match='selection_fraction'):
    merge.merge_workdirs('greedy_soup', [sources[0], plain], str(tmp_path / 'refused'))


def test_merge_script_refuses_sources_that_differ_in_one_line(tmp_path):
  small, wide = str(tmp_path / 'small'), str(tmp_path / 'wide')
  short_run(load_config('dense_tiny'), small, steps=1)
  config = load_config('dense_tiny')
  config.model.update(d_model=64, num_heads=2)
  short_run(config, wide, steps=1)
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, 'experiments', 'merge.py'), '--method=soup',
       f'--sources={small},{wide}', f'--workdir={tmp_path / "out"}'],
      capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('merge: model.d_model: 32') and '64' in last, result.stderr
  assert not (tmp_path / 'out').exists()


def test_merge_script_takes_overrides_on_the_first_sources_config(tmp_path):
  dense, out = str(tmp_path / 'dense'), str(tmp_path / 'up')
  short_run(load_config('dense_tiny'), dense, steps=1)
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, 'experiments', 'merge.py'), '--method=upcycle',
       '--sources', dense, f'--workdir={out}', '--config.train.num_steps=7'],
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  config = workdir_lib.load_config(out)
  assert (config.train.num_steps, config.model.ffn) == (7, 'moe')
  assert workdir_lib.load_config(dense).train.num_steps != 7
