"""Smoke run of experiments/bench_moe.py on CPU: every case runs and the JSON holds the table."""
import functools
import json
import pathlib

from absl import flags
from absl.testing import flagsaver
import jax.numpy as jnp
import pytest

from moejax import config_files

_PATH = pathlib.Path(__file__).parents[1] / 'experiments' / 'bench_moe.py'


@functools.cache
def load_bench():
  """Imports the script once: its absl flags can be defined only once per process."""
  return config_files.load_module(str(_PATH))


@pytest.mark.slow
def test_smoke_run_writes_every_case(tmp_path):
  bench = load_bench()
  out = tmp_path / 'bench.json'
  flags.FLAGS.mark_as_parsed()  # other scripts' required flags may share this process
  with flagsaver.flagsaver(smoke=True, json_out=str(out), routings=['zipf'], impls=['hopper']):
    bench.main(['bench_moe'])
  report = json.loads(out.read_text())
  assert report['platform'] == 'cpu'
  cases = {(r['case'], r['mode']) for r in report['results']}
  for case in ('roof', 'dense_ffn', 'ragged/hopper', 'capacity', 'dense'):
    assert {(case, 'fwd'), (case, 'fwd+bwd')} <= cases
  for r in report['results']:
    assert r['ms'] > 0 and r['p10_ms'] <= r['ms'] <= r['p90_ms']
    assert r['routing'] == 'zipf'
    if r['case'] in ('ragged/hopper', 'dense', 'dense_ffn', 'roof'):
      assert r['dropped_fraction'] == 0.0  # dropless
  dense = [r for r in report['results'] if r['case'] == 'dense_ffn']
  assert all(r['vs_dense'] == 1.0 for r in dense)
  # Zipf routing puts more than the balanced 1/E share on the busiest expert.
  ragged = next(r for r in report['results'] if r['case'] == 'ragged/hopper')
  assert ragged['max_expert_fraction'] > 1.5 / ragged['E']
  # ... more than capacity_factor 1.25 allows it, so the capacity dispatch drops slots.
  capacity = next(r for r in report['results'] if r['case'] == 'capacity')
  assert capacity['dropped_fraction'] > 0.0


def test_products_smoke_times_six_products_per_impl(tmp_path):
  bench = load_bench()
  out = tmp_path / 'products.json'
  flags.FLAGS.mark_as_parsed()  # other scripts' required flags may share this process
  with flagsaver.flagsaver(smoke=True, products=True, json_out=str(out),
                           impls=['xla', 'hopper_ws']):
    bench.main(['bench_moe'])
  rows = json.loads(out.read_text())['results']
  # Off Hopper 'hopper_ws' resolves to itself and falls back per product; both are timed.
  names = {(r['weight'], r['case']) for r in rows}
  for weight in ('wi', 'wo'):
    for op in ('gmm', 'gmm_t', 'tgmm'):
      assert {(weight, f'{op}/xla'), (weight, f'{op}/hopper_ws')} <= names
  for case in ('glu', 'glu_fwd+bwd'):
    assert {('wi', f'{case}/xla'), ('wi', f'{case}/hopper_ws')} <= names
  t, d, f, e, k = bench.SMOKE_SHAPES[0]
  for r in rows:
    assert r['M'] == t * k and {r['K'], r['N']} == {d, f}
    products = {'glu': 4, 'glu_fwd+bwd': 12}.get(r['case'].split('/')[0], 2)
    assert r['tflops'] == pytest.approx(products * r['M'] * r['K'] * r['N'] / r['ms'] / 1e9)
    # Checked against the float32 per-group reference: float32 products agree to rounding.
    assert r['correct'] and r['rel_err'] < 1e-5


def test_products_mark_a_wrong_product(monkeypatch):
  bench = load_bench()
  right = bench.gmm_lib.forward_product
  monkeypatch.setattr(bench.gmm_lib, 'forward_product',
                      lambda *args, **kwargs: 1.05 * right(*args, **kwargs))
  lines = []
  rows = bench.bench_products(bench.SMOKE_SHAPES[0], ['xla'], jnp.float32, repeats=3,
                              seconds=0.01, sweep=False, log=lines.append)
  by_case = {(r['weight'], r['case']): r for r in rows}
  for weight in ('wi', 'wo'):
    assert by_case[(weight, 'gmm/xla')]['rel_err'] == pytest.approx(0.05, rel=1e-4)
    assert not by_case[(weight, 'gmm/xla')]['correct']
    assert by_case[(weight, 'tgmm/xla')]['correct']
  assert sum(line.endswith('WRONG') for line in lines) >= 2


def test_ws_variants_fit_their_shapes():
  bench = load_bench()
  fns = bench._ws_variant_fns('gmm', 2048, 1408, group_sizes=None)
  # 1408 = 11 x 128 columns: only the 64-wide consumer tiles (CTA 128) fit.
  assert fns and all(name.endswith('n64]') for name in fns)
  assert len(bench._ws_variant_fns('tgmm', 2048, 4096, group_sizes=None)) == len(bench.WS_VARIANTS)
  assert not bench._ws_variant_fns('gmm_t', 2048, 100, group_sizes=None)  # N % 64 != 0


def test_unknown_routing_fails_before_timing():
  bench = load_bench()
  with pytest.raises(ValueError, match=r"\['uniform'\]"):
    bench.run([(8, 4, 2, 4, 2)], ['zipf', 'uniform'], ['xla'], ['ragged'], capacity_factor=1.0,
              seq_len=8, dtype='float32', repeats=1, seconds=0.0, dense_max_elements=0)


def test_parse_shape():
  bench = load_bench()
  assert bench.parse_shape('8:4:2:4:2') == (8, 4, 2, 4, 2)
  with pytest.raises(ValueError, match='T:D:F:E:k'):
    bench.parse_shape('8:4:2')
