"""Hopper (sm90) grouped matmuls: shape checks, padding and tiles for the Mosaic-GPU kernels.

Shapes: M rows (token slots sorted by group), K contraction of the forward, N output of the forward,
G groups (experts).

Three products make a grouped matmul and its gradients:
  gmm      y  [M, N] = x  [M, K] @ w[g]   [K, N]
  gmm_t    dx [M, K] = dy [M, N] @ w[g]^T [N, K]
  tgmm     dw [G, K, N] = x_g^T [K, M_g] @ dy_g [M_g, N]

Implementations (`IMPLS`, the `gmm_impl` values that run here):
  'hopper'    the Pallas Mosaic-GPU kernels that ship with JAX (`ragged_dot_mgpu`,
              `transposed_ragged_dot_mgpu`): one warpgroup per 128x128 tile; measured on an H100.
  'hopper_ws' moejax's warp-specialized kernels in `hopper_ws.py`: a TMA producer warpgroup and
              two consumer warpgroups on a 128x256 tile.
Their paired form (`_PAIRED`, which 'hopper_ws' uses for the gated layer) puts both consumers on
one 128x128 output tile, one product each. It serves a gated FFN's first layer (`glu`:
act(x w0) * (x w1), one shared x tile), its input gradient (`gmm_t_sum`: dh0 w0^T + dh1 w1^T
summed on chip) and its weight gradients (`tgmm_pair`: x^T dh0 and x^T dh1, one shared x tile).

The kernels want: equal fp16/bf16 operand dtypes, the contraction a multiple of its tile depth,
the output columns a multiple of the column tile (and for `tgmm` the output rows a multiple of the
row tile). Small misfits are padded here with zeros; anything else gets a reason string from
`*_reason`, and the caller (grouped_matmul.py) falls back to `jax.lax.ragged_dot`. The forward
kernels leave rows past `sum(group_sizes)` unwritten, so those rows are zeroed with a `where` that
XLA fuses into the consumer.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp

from moejax.kernels import hopper_ws

IMPLS = ('hopper', 'hopper_ws')
_PAIRED = 'hopper_ws_pair'  # tile choice of the paired kernels (glu, gmm_t_sum, tgmm_pair)
_OPS = ('gmm', 'gmm_t', 'tgmm')
_DTYPES = (jnp.bfloat16, jnp.float16)
# Padding a dimension by more than this share of its size costs more than the kernel saves.
_MAX_PAD_FRACTION = 0.125
# The kernels' TMA tiles want the row count to be a multiple of 8.
_ROW_MULTIPLE = 8


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Tile sizes of one Mosaic-GPU kernel call (see the kernels' docstrings in JAX)."""
  block_m: int
  block_n: int
  block_k: int
  max_concurrent_steps: int
  grid_block_n: int


# Measured on one H100 SXM (jax 0.11.2, bf16, docs/gpu_kernel_notes.md), keyed by (op, K, N) of the
# forward product [M, K] x [G, K, N]; `_default_config` serves other shapes.
TUNED: dict[tuple[str, int, int], BlockConfig] = {
    ('gmm', 4096, 2048): BlockConfig(128, 128, 64, 4, 4),
    ('gmm', 1408, 2048): BlockConfig(128, 128, 64, 4, 8),
    ('gmm', 14336, 4096): BlockConfig(128, 128, 64, 4, 4),
    ('tgmm', 2048, 4096): BlockConfig(128, 128, 64, 4, 1),
    ('tgmm', 4096, 14336): BlockConfig(128, 128, 64, 4, 1),
}


def _default_config(op: str, k: int, n: int) -> BlockConfig:
  """128x128 tiles, 64-deep steps; 64-wide tiles where 128 does not divide the dimension."""
  block_n = 128 if n % 128 == 0 else 64
  if op == 'tgmm':
    return BlockConfig(block_m=128 if k % 128 == 0 else 64, block_n=block_n, block_k=64,
                       max_concurrent_steps=4, grid_block_n=4)
  return BlockConfig(block_m=128, block_n=block_n, block_k=64, max_concurrent_steps=5,
                     grid_block_n=4)


def block_config(op: str, k: int, n: int) -> BlockConfig:
  """Tile sizes for `op` in ('gmm', 'gmm_t', 'tgmm') of the forward product [M, k] x [G, k, n]."""
  if op not in _OPS:
    raise ValueError(f'op must be one of {_OPS}, got {op!r}')
  if (op, k, n) in TUNED:
    return TUNED[(op, k, n)]
  # gmm_t contracts over n and writes k columns.
  return _default_config(op, n, k) if op == 'gmm_t' else _default_config(op, k, n)


def _round_up(a: int, b: int) -> int:
  return -(-a // b) * b


@functools.lru_cache(maxsize=None)
def platform_reason() -> str | None:
  """None when the default device is an sm90 GPU with the Mosaic-GPU kernels, else why not."""
  device = jax.devices()[0]
  if device.platform != 'gpu':
    return f'default device is {device.platform}, not an sm90 GPU'
  capability = getattr(device, 'compute_capability', '')
  if not str(capability).startswith('9.'):
    return f'GPU compute capability {capability} is not 9.x (Hopper)'
  try:
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu  # noqa: F401
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu  # noqa: F401
  except ImportError as e:
    return f'Mosaic-GPU kernels unavailable: {e}'
  return None


def ws_config(op: str, k: int, n: int) -> hopper_ws.WSConfig:
  """Tiles of the warp-specialized kernels for `op` on the forward product [M, k] x [G, k, n].

  The 256-wide CTA tile (two 128-wide consumer tiles) halves to 128 where it does not divide
  the output columns (F = 1408 = 11 x 128, for example) rather than padding them.
  """
  if op not in _OPS:
    raise ValueError(f'op must be one of {_OPS}, got {op!r}')
  out_cols = k if op == 'gmm_t' else n
  return hopper_ws.WSConfig(tile_n=128 if out_cols % 256 == 0 else 64)


def ws_pair_config(op: str, k: int, n: int) -> hopper_ws.WSConfig:
  """Tiles of the paired kernels for `op` on the forward product [M, k] x [G, k, n]."""
  if op not in _OPS:
    raise ValueError(f'op must be one of {_OPS}, got {op!r}')
  out_cols = k if op == 'gmm_t' else n
  return hopper_ws.WSConfig(tile_n=128 if out_cols % 128 == 0 else 64)


def tile_multiples(op: str, row_tile: int, col_tile: int, depth: int) -> dict[str, int]:
  """What K and N must be multiples of for `op` on [M, K] x [G, K, N], given a kernel's output
  tile (row_tile x col_tile) and contraction step (depth)."""
  if op == 'gmm':
    return {'K': depth, 'N': col_tile}
  if op == 'gmm_t':  # contracts over N and writes K columns
    return {'N': depth, 'K': col_tile}
  return {'K': row_tile, 'N': col_tile}  # tgmm writes [K, N] tiles, contracts over rows


def _multiples(op: str, impl: str, k: int, n: int) -> dict[str, int]:
  """`tile_multiples` of the tiles that implementation `impl` uses for `op`."""
  if impl == 'hopper':
    cfg = block_config(op, k, n)
    return tile_multiples(op, cfg.block_m, cfg.block_n, cfg.block_k)
  if impl == 'hopper_ws':
    cfg = ws_config(op, k, n)
    return tile_multiples(op, cfg.tile_m, cfg.cta_n, cfg.tile_k)
  if impl == _PAIRED:
    cfg = ws_pair_config(op, k, n)
    return tile_multiples(op, cfg.tile_m, cfg.tile_n, cfg.tile_k)
  raise ValueError(f'impl must be one of {IMPLS + (_PAIRED,)}, got {impl!r}')


def _shape_reason(op: str, impl: str, m: int, k: int, n: int, dtype) -> str | None:
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _DTYPES]:
    return f'dtype {jnp.dtype(dtype).name} is not bfloat16/float16'
  sizes = {'M': m, 'K': k, 'N': n}
  multiples = {'M': 1, **_multiples(op, impl, k, n)}
  for name, multiple in multiples.items():
    size = sizes[name]
    if size == 0:
      return f'{name}=0'
    pad = _round_up(size, multiple) - size
    if pad > _MAX_PAD_FRACTION * size:
      return f'{name}={size} needs padding by {pad} to a multiple of {multiple}'
  return None


def gmm_reason(m: int, k: int, n: int, dtype, impl: str = 'hopper') -> str | None:
  """Why `gmm` cannot serve [m, k] x [G, k, n] (None if it can)."""
  return _shape_reason('gmm', impl, m, k, n, dtype)


def gmm_t_reason(m: int, k: int, n: int, dtype, impl: str = 'hopper') -> str | None:
  """Why `gmm_t` cannot serve [m, n] x [G, k, n]^T (None if it can)."""
  return _shape_reason('gmm_t', impl, m, k, n, dtype)


def tgmm_reason(m: int, k: int, n: int, dtype, impl: str = 'hopper') -> str | None:
  """Why `tgmm` cannot serve x [m, k], dy [m, n] -> [G, k, n] (None if it can)."""
  return _shape_reason('tgmm', impl, m, k, n, dtype)


def _pad_axis(a, axis: int, multiple: int):
  size = a.shape[axis]
  pad = _round_up(size, multiple) - size
  if pad == 0:
    return a
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, pad)
  return jnp.pad(a, widths)


def _pad_rows(a, col_multiple: int):
  """A row operand [M, C]: C up to col_multiple, M up to the TMA row multiple."""
  return _pad_axis(_pad_axis(a, 1, col_multiple), 0, _ROW_MULTIPLE)


def _pad_weights(w, mult: dict[str, int]):
  """Stacked weights [G, K, N]: K and N up to their multiples."""
  return _pad_axis(_pad_axis(w, 1, mult['K']), 2, mult['N'])


def _zero_tail_rows(y, group_sizes):
  """Rows past sum(group_sizes) are never written by the kernel."""
  rows = jax.lax.broadcasted_iota(jnp.int32, (y.shape[0], 1), 0)
  return jnp.where(rows < jnp.sum(group_sizes), y, jnp.zeros((), y.dtype))


def _ragged_dot(op: str, impl: str, lhs, rhs, group_sizes, k: int, n: int,
                transpose_rhs: bool):
  if impl == 'hopper_ws':
    return hopper_ws.gmm(lhs, rhs, group_sizes, cfg=ws_config(op, k, n),
                         transpose_rhs=transpose_rhs)
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
  return ragged_dot_mgpu.ragged_dot(lhs, rhs, group_sizes=group_sizes, transpose_rhs=transpose_rhs,
                                    **dataclasses.asdict(block_config(op, k, n)))


def gmm(x, w, group_sizes, impl: str = 'hopper'):
  """[M, K] x [G, K, N] -> [M, N] (bf16/fp16, f32 accumulation); check `gmm_reason` first."""
  m, k = x.shape
  n = w.shape[2]
  mult = _multiples('gmm', impl, k, n)
  y = _ragged_dot('gmm', impl, _pad_rows(x, mult['K']), _pad_weights(w, mult), group_sizes,
                  k, n, transpose_rhs=False)
  return _zero_tail_rows(y[:m, :n], group_sizes)


def gmm_t(dy, w, group_sizes, impl: str = 'hopper'):
  """[M, N] x [G, K, N]^T -> [M, K]: the input gradient of `gmm`; check `gmm_t_reason` first."""
  m = dy.shape[0]
  k, n = w.shape[1:]
  mult = _multiples('gmm_t', impl, k, n)
  dx = _ragged_dot('gmm_t', impl, _pad_rows(dy, mult['N']), _pad_weights(w, mult),
                   group_sizes, k, n, transpose_rhs=True)
  return _zero_tail_rows(dx[:m, :k], group_sizes)


def tgmm(x, dy, group_sizes, impl: str = 'hopper'):
  """x [M, K], dy [M, N] -> [G, K, N], dw[g] = x_g^T dy_g; check `tgmm_reason` first."""
  k, n = x.shape[1], dy.shape[1]
  mult = _multiples('tgmm', impl, k, n)
  xp, dyp = _pad_rows(x, mult['K']), _pad_rows(dy, mult['N'])
  if impl == 'hopper_ws':
    dw = hopper_ws.tgmm(xp, dyp, group_sizes, cfg=ws_config('tgmm', k, n))
  else:
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu
    dw = transposed_ragged_dot_mgpu.transposed_ragged_dot(
        xp, dyp, group_sizes=group_sizes, **dataclasses.asdict(block_config('tgmm', k, n)))
  return dw[:, :k, :n]


def glu_reason(m: int, k: int, n: int, dtype) -> str | None:
  """Why `glu` cannot serve x [m, k] with w0, w1 [G, k, n] (None if it can)."""
  return _shape_reason('gmm', _PAIRED, m, k, n, dtype)


def gmm_t_sum_reason(m: int, k: int, n: int, dtype) -> str | None:
  """Why `gmm_t_sum` cannot serve dy0, dy1 [m, n] with w0, w1 [G, k, n] (None if it can)."""
  return _shape_reason('gmm_t', _PAIRED, m, k, n, dtype)


def tgmm_pair_reason(m: int, k: int, n: int, dtype) -> str | None:
  """Why `tgmm_pair` cannot serve x [m, k] with dy0, dy1 [m, n] (None if it can)."""
  return _shape_reason('tgmm', _PAIRED, m, k, n, dtype)


def glu(x, w0, w1, group_sizes, activation):
  """x [M, K], w0, w1 [G, K, N] -> (h0, h1, activation(h0) * h1), each [M, N]."""
  m, k = x.shape
  n = w0.shape[2]
  mult = _multiples('gmm', _PAIRED, k, n)
  outs = hopper_ws.gmm_pair(_pad_rows(x, mult['K']), _pad_weights(w0, mult),
                            _pad_weights(w1, mult), group_sizes, epilogue='glu',
                            activation=activation, cfg=ws_pair_config('gmm', k, n))
  return tuple(_zero_tail_rows(o[:m, :n], group_sizes) for o in outs)


def gmm_t_sum(dy0, w0, dy1, w1, group_sizes):
  """dy0, dy1 [M, N], w0, w1 [G, K, N] -> dy0 w0[g]^T + dy1 w1[g]^T [M, K]."""
  m = dy0.shape[0]
  k, n = w0.shape[1:]
  mult = _multiples('gmm_t', _PAIRED, k, n)
  dx = hopper_ws.gmm_pair(_pad_rows(dy0, mult['N']), _pad_weights(w0, mult),
                          _pad_weights(w1, mult), group_sizes, lhs1=_pad_rows(dy1, mult['N']),
                          epilogue='sum', cfg=ws_pair_config('gmm_t', k, n), transpose_rhs=True)
  return _zero_tail_rows(dx[:m, :k], group_sizes)


def tgmm_pair(x, dy0, dy1, group_sizes):
  """x [M, K], dy0, dy1 [M, N] -> (x_g^T dy0_g, x_g^T dy1_g), each [G, K, N]."""
  k, n = x.shape[1], dy0.shape[1]
  mult = _multiples('tgmm', _PAIRED, k, n)
  dw0, dw1 = hopper_ws.tgmm(_pad_rows(x, mult['K']), _pad_rows(dy0, mult['N']), group_sizes,
                            rhs1=_pad_rows(dy1, mult['N']), cfg=ws_pair_config('tgmm', k, n))
  return dw0[:, :k, :n], dw1[:, :k, :n]
