"""Tests for moejax/kernels/hopper_ws.py, the warp-specialized Hopper grouped matmuls, on CPU.

Three checks that need no GPU:
  - the row-tile schedule (`_RowTile`) covers every row of every group exactly once;
  - each kernel lowers for CUDA (Pallas -> Mosaic GPU, including layout inference and the
    shared-memory budget) at the benchmark's model shapes;
  - with jax >= 0.11, each kernel runs under the Mosaic-GPU interpreter, which simulates the
    warpgroups, TMA copies and barriers on CPU, matches `jax.lax.ragged_dot`, and shows no data
    race to the interpreter's race detector (the paired kernels hand tiles between consumers).
tests/test_grouped_matmul.py and tests/test_grouped_glu.py run the same kernels on an H100.
"""
from unittest import mock

from absl.testing import parameterized
import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu
import numpy as np

from moejax.kernels import hopper
from moejax.kernels import hopper_ws

HAS_INTERPRETER = hasattr(plgpu, 'force_gpu_interpret_mode')


def _sizes(mode, m, g):
  rng = np.random.default_rng(m + g)
  if mode == 'balanced':
    cuts = np.linspace(0, m, g + 1).astype(int)
  else:  # random cut points, with repeats: empty groups
    cuts = np.sort(np.concatenate([[0, m], rng.integers(0, m, g - 1)]))
    if mode == 'empty':
      cuts[1:g // 2] = cuts[0]
  return np.diff(cuts).astype(np.int32)


class RowTileTest(parameterized.TestCase):

  @parameterized.product(mode=('balanced', 'random', 'empty'), m=(64, 200, 1000),
                         g=(1, 3, 8), tile_m=(64, 128))
  def test_every_row_is_served_once_by_its_group(self, mode, m, g, tile_m):
    sizes = _sizes(mode, m, g)
    group_of_row = np.repeat(np.arange(g), sizes)
    served = np.zeros(m, int)
    num_ids = -(-m // tile_m) + g - 1
    for tile_id in range(num_ids):
      tile = hopper_ws._RowTile.find(jnp.asarray(sizes), g, tile_m, jnp.int32(tile_id))
      size, first = int(tile.size), int(tile.first_row)
      rows = int(tile.block) * tile_m + first + np.arange(size)
      self.assertLessEqual(first + size, tile_m)
      np.testing.assert_array_equal(group_of_row[rows], int(tile.group))
      served[rows] += 1
    np.testing.assert_array_equal(served, 1)


def _lower_for_cuda(fn, *shapes):
  args = [jax.ShapeDtypeStruct(s, jnp.int32 if len(s) == 1 else jnp.bfloat16) for s in shapes]
  return jax.export.export(jax.jit(fn), platforms=('cuda',))(*args).mlir_module()


class LoweringTest(parameterized.TestCase):
  """The products of experiments/bench_moe.py's shapes at their production tile sizes."""

  @parameterized.parameters(
      (32768, 2048, 4096, 8),    # T=16384, D=2048, F=4096, E=8, k=2
      (98304, 2048, 1408, 64),   # T=16384, D=2048, F=1408, E=64, k=6
      (16384, 4096, 14336, 8),   # T=8192, D=4096, F=14336, E=8, k=2
  )
  def test_products_lower_for_cuda(self, m, d, f, e):
    for k, n in ((d, f), (f, d)):  # wi_0 / wi_1: [D, F]; wo: [F, D]
      fwd = lambda x, w, s, k=k, n=n: hopper_ws.gmm(x, w, s, cfg=hopper.ws_config('gmm', k, n))
      dx = lambda dy, w, s, k=k, n=n: hopper_ws.gmm(
          dy, w, s, cfg=hopper.ws_config('gmm_t', k, n), transpose_rhs=True)
      dw = lambda x, dy, s, k=k, n=n: hopper_ws.tgmm(x, dy, s, cfg=hopper.ws_config('tgmm', k, n))
      self.assertIn('mosaic_gpu', _lower_for_cuda(fwd, (m, k), (e, k, n), (e,)))
      self.assertIn('mosaic_gpu', _lower_for_cuda(dx, (m, n), (e, k, n), (e,)))
      self.assertIn('mosaic_gpu', _lower_for_cuda(dw, (m, k), (m, n), (e,)))

  @parameterized.parameters((32768, 2048, 4096, 8), (98304, 2048, 1408, 64))
  def test_paired_kernels_lower_for_cuda(self, m, d, f, e):
    glu = lambda x, w0, w1, s: hopper_ws.gmm_pair(
        x, w0, w1, s, epilogue='glu', activation=jax.nn.silu,
        cfg=hopper.ws_pair_config('gmm', d, f))
    dx = lambda dh0, w0, w1, dh1, s: hopper_ws.gmm_pair(
        dh0, w0, w1, s, lhs1=dh1, epilogue='sum', cfg=hopper.ws_pair_config('gmm_t', d, f),
        transpose_rhs=True)
    self.assertIn('mosaic_gpu', _lower_for_cuda(glu, (m, d), (e, d, f), (e, d, f), (e,)))
    self.assertIn('mosaic_gpu', _lower_for_cuda(dx, (m, f), (e, d, f), (e, d, f), (m, f), (e,)))
    dw = lambda x, dh0, dh1, s: hopper_ws.tgmm(x, dh0, s, rhs1=dh1,
                                               cfg=hopper.ws_pair_config('tgmm', d, f))
    self.assertIn('mosaic_gpu', _lower_for_cuda(dw, (m, d), (m, f), (m, f), (e,)))

  def test_too_many_stages_exceed_shared_memory(self):
    # 4 stages of 48 KiB plus two 32 KiB output tiles: over the H100's 227 KiB.
    cfg = hopper_ws.WSConfig(max_concurrent_steps=4)
    with self.assertRaisesRegex(Exception, 'shared memory'):
      _lower_for_cuda(lambda x, w, s: hopper_ws.gmm(x, w, s, cfg=cfg),
                      (4096, 1024), (8, 1024, 1024), (8,))

  def test_bad_shapes_raise(self):
    x, w, s = jnp.ones((64, 100), jnp.bfloat16), jnp.ones((2, 100, 256), jnp.bfloat16), jnp.ones(2)
    with self.assertRaisesRegex(ValueError, 'K % 64'):
      hopper_ws.gmm(x, w, s)
    with self.assertRaisesRegex(ValueError, 'matching dtypes'):
      hopper_ws.tgmm(jnp.ones((64, 128), jnp.float16), jnp.ones((64, 256), jnp.bfloat16), s)
    with self.assertRaisesRegex(ValueError, "'glu' with an activation"):
      hopper_ws.gmm_pair(x, w, w, s, epilogue='glu')


# dw[g] = x_g^T dy_g: contract the ragged rows.
_WEIGHT_GRAD_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[])


def _rel_err(got, want):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return np.linalg.norm(got - want) / np.linalg.norm(want)


def _interpret(fn, *args):
  """fn(*args) with every Mosaic-GPU kernel interpreted on CPU; fails on a detected data race."""
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks  # the race detector's state
  with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=True)):
    out = jax.block_until_ready(fn(*args))
  assert not gpu_callbacks.get_races().races_found, f'data race in {fn.__name__}'
  return out


class InterpreterTest(parameterized.TestCase):
  """The kernels through hopper.py's padding, on CPU; a few seconds per product."""

  def setUp(self):
    super().setUp()
    if not HAS_INTERPRETER:
      self.skipTest(f'jax {jax.__version__} has no Mosaic-GPU interpreter (needs >= 0.11)')
    # Two simulated SMs: each walks several tiles, and the interpreter stays quick.
    patcher = mock.patch.object(hopper_ws, 'num_sms', lambda: 2)
    patcher.start()
    self.addCleanup(patcher.stop)

  @parameterized.parameters(
      (256, 128, 256, 2, 'balanced'),
      (300, 128, 128, 4, 'empty'),    # N = 128: one 64-wide tile per consumer
      (250, 192, 256, 5, 'random'),   # rows not a multiple of 8
  )
  def test_matches_ragged_dot(self, m, k, n, g, mode):
    sizes = _sizes(mode, m, g)
    sizes[-1] -= 3  # three trailing rows outside every group
    gs = jnp.asarray(sizes)
    keys = jax.random.split(jax.random.key(m), 3)
    x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    w = (jax.random.normal(keys[1], (g, k, n)) / np.sqrt(k)).astype(jnp.bfloat16)
    dy = jax.random.normal(keys[2], (m, n), jnp.bfloat16)
    y = _interpret(hopper.gmm, x, w, gs, 'hopper_ws')
    dx = _interpret(hopper.gmm_t, dy, w, gs, 'hopper_ws')
    dw = _interpret(hopper.tgmm, x, dy, gs, 'hopper_ws')
    f32 = lambda a: a.astype(jnp.float32)
    ref_y, ref_vjp = jax.vjp(lambda x, w: jax.lax.ragged_dot(x, w, gs), f32(x), f32(w))
    ref_dx, ref_dw = ref_vjp(f32(dy))
    for got, want in ((y, ref_y), (dx, ref_dx), (dw, ref_dw)):
      self.assertLess(_rel_err(got, want), 1e-2)
    np.testing.assert_array_equal(np.asarray(y[m - 3:], np.float32), 0.0)
    np.testing.assert_array_equal(np.asarray(dx[m - 3:], np.float32), 0.0)
    empty = np.flatnonzero(sizes == 0)
    np.testing.assert_array_equal(np.asarray(dw[empty], np.float32), 0.0)

  @parameterized.parameters(
      (256, 128, 256, 2, 'balanced'),
      (300, 128, 320, 4, 'empty'),    # N = 320: 64-wide tiles
      (250, 256, 128, 5, 'random'),   # rows not a multiple of 8
  )
  def test_paired_kernels_match_separate_products(self, m, d, f, g, mode):
    sizes = _sizes(mode, m, g)
    sizes[-1] -= 3
    gs = jnp.asarray(sizes)
    keys = jax.random.split(jax.random.key(m + 1), 5)
    x = jax.random.normal(keys[0], (m, d), jnp.bfloat16)
    w0, w1 = ((jax.random.normal(key, (g, d, f)) / np.sqrt(d)).astype(jnp.bfloat16)
              for key in keys[1:3])
    dh0, dh1 = (jax.random.normal(key, (m, f), jnp.bfloat16) for key in keys[3:])
    h0, h1, a = _interpret(hopper.glu, x, w0, w1, gs, jax.nn.silu)
    dx = _interpret(hopper.gmm_t_sum, dh0, w0, dh1, w1, gs)
    dw0, dw1 = _interpret(hopper.tgmm_pair, x, dh0, dh1, gs)
    f32 = lambda t: t.astype(jnp.float32)
    ref_h0 = jax.lax.ragged_dot(f32(x), f32(w0), gs)
    ref_h1 = jax.lax.ragged_dot(f32(x), f32(w1), gs)
    ref_dx = (jax.lax.ragged_dot(f32(dh0), jnp.swapaxes(f32(w0), 1, 2), gs)
              + jax.lax.ragged_dot(f32(dh1), jnp.swapaxes(f32(w1), 1, 2), gs))
    for got, want in ((h0, ref_h0), (h1, ref_h1), (a, jax.nn.silu(ref_h0) * ref_h1),
                      (dx, ref_dx)):
      self.assertLess(_rel_err(got, want), 1e-2)
      np.testing.assert_array_equal(np.asarray(got[m - 3:], np.float32), 0.0)
    weight_grad = lambda dh: jax.lax.ragged_dot_general(f32(x), f32(dh), gs, _WEIGHT_GRAD_DIMS)
    self.assertLess(_rel_err(dw0, weight_grad(dh0)), 1e-2)
    self.assertLess(_rel_err(dw1, weight_grad(dh1)), 1e-2)
