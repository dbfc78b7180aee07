"""Tests for moejax/memory.py: counts and bytes from the real pytrees, and the run's first line."""
import json
import os

from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax import config_files
from moejax import memory
from moejax import model as model_lib
from moejax import precision
from moejax import train



def smoke_config():
  return config_files.get_config('moe_tiny:smoke')


def abstract_state(config):
  model = model_lib.build_model(config.model, precision.get_policy(config.precision.policy))
  tx, _ = train.make_optimizer(config)
  return nn.unbox(jax.eval_shape(train.make_init_fn(config, model, tx), jax.random.PRNGKey(0)))


class MemoryTest(parameterized.TestCase):

  @parameterized.parameters(('fp32', 4, 8), ('bf16', 4, 6), ('pure_bf16', 2, 4), ('fp16', 4, 8))
  def test_bytes_per_parameter_follow_the_policy(self, policy, param_bytes, moment_bytes):
    config = smoke_config()
    config.precision.policy = policy
    state = abstract_state(config)
    acc = memory.state_accounting(state.params, state.opt_state, config.model)
    n = acc['num_params']
    self.assertEqual(n, sum(np.prod(x.shape) for x in jax.tree.leaves(state.params)))
    self.assertEqual(acc['params_bytes'], param_bytes * n)
    # Plus the step counters of Adam and the learning-rate schedule: a few scalars.
    self.assertBetween(acc['opt_state_bytes'] - moment_bytes * n, 0, 64)

  def test_active_params_count_top_k_of_the_routed_experts(self):
    config = smoke_config()
    m, d = config.model.moe, config.model.d_model
    state = abstract_state(config)
    acc = memory.state_accounting(state.params, state.opt_state, config.model)
    expert_params = config.model.num_layers * 3 * m.num_experts * d * m.d_ff
    inactive = expert_params * (m.num_experts - m.top_k) // m.num_experts
    self.assertEqual(acc['num_active_params'], acc['num_params'] - inactive)
    self.assertEqual(memory.expert_weight_bytes(state.params), 4 * expert_params)
    dense = smoke_config()
    dense.model.ffn = 'dense'
    state = abstract_state(dense)
    acc = memory.state_accounting(state.params, state.opt_state, dense.model)
    self.assertEqual(acc['num_active_params'], acc['num_params'])
    self.assertEqual(memory.expert_weight_bytes(state.params), 0)

  def test_format_accounting(self):
    line = memory.format_accounting(dict(num_params=1000, num_active_params=400,
                                         params_bytes=2000, opt_state_bytes=4016))
    self.assertEqual(line, 'params: 1,000 total, 400 active per token; bytes per parameter: '
                           'params 2.00, optimizer state 4.02')

  def test_compiled_memory_reports_the_step(self):
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    stats = memory.compiled_memory(f.lower(jnp.ones((64, 32))).compile())
    self.assertEqual(stats['argument_bytes'], 64 * 32 * 4)
    self.assertGreaterEqual(stats['temp_bytes'], 0)


def test_first_metrics_line_holds_the_accounting(tmp_path, capsys):
  config = smoke_config()
  config.train.update(num_steps=1, log_every=1, eval_every=1, checkpoint_every=1)
  config.optim.warmup_steps = 0
  config.precision.policy = 'pure_bf16'
  train.train_and_evaluate(config, str(tmp_path))
  with open(os.path.join(tmp_path, 'metrics.jsonl')) as f:
    first = json.loads(f.readline())
  n = first['num_params']
  assert first['step'] == 0 and n > first['num_active_params'] > 0
  assert first['params_bytes'] == 2 * n
  assert 0 <= first['opt_state_bytes'] - 4 * n <= 64
  assert 'bytes per parameter: params 2.00, optimizer state 4.00' in capsys.readouterr().out
