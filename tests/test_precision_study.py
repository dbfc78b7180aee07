"""Tests for experiments/precision_study.py: each variant's config and the table (no training)."""
import pytest

from moejax import config_files

study = config_files.load_module('experiments/precision_study.py')


def test_variants_set_their_precision_and_shorten_the_run():
  configs = {name: study.variant_config(name, num_steps=40, batch_size=4, arg='smoke')
             for name in study.VARIANTS}
  assert {name: c.precision.policy for name, c in configs.items()} == {
      'fp32': 'fp32', 'bf16': 'bf16', 'pure_bf16_rtn': 'pure_bf16', 'pure_bf16_sr': 'pure_bf16',
      'fp16': 'fp16', 'int8_qat': 'fp32', 'bf16_router': 'bf16'}
  assert not configs['pure_bf16_rtn'].precision.stochastic_rounding
  assert configs['pure_bf16_sr'].precision.stochastic_rounding
  assert configs['int8_qat'].precision.int8_training
  assert not configs['fp32'].precision.int8_training
  assert configs['bf16_router'].model.moe.router_dtype == 'bfloat16'
  assert configs['bf16'].model.moe.router_dtype == 'float32'
  for config in configs.values():
    assert (config.train.num_steps, config.train.eval_every, config.data.batch_size) == (40, 40, 4)
    assert config.optim.warmup_steps <= 4
  with pytest.raises(ValueError, match="variant 'fp8'"):
    study.variant_config('fp8', 10)


def test_table_reports_each_loss_against_fp32():
  row = dict(eval_bits_per_byte=3.0, tokens_per_s=1000.0, skipped_steps=0.0,
             params_bytes_per_param=4.0, opt_state_bytes_per_param=8.0)
  table = study.format_table([dict(row, variant='fp32', eval_loss=2.0),
                              dict(row, variant='fp16', eval_loss=2.1)])
  lines = table.splitlines()
  assert len(lines) == 4 and lines[0].startswith('| variant | eval loss | vs fp32 |')
  assert '| fp16 | 2.1000 | +5.00 % |' in lines[3]
