"""Grouped matmuls as a loop of dense matmuls over row blocks, in plain XLA.

Shapes: M rows (sorted by group), K contraction, N output, G groups, B rows per block,
NB blocks (a static bound: every group cut into blocks of B rows fits in NB blocks).

Each group's rows are cut into blocks of B rows (the last block of a group partial, as in
MegaBlocks' block-sparse layout, Gale et al. 2022), every block is tagged with its group, and a
`fori_loop` over the blocks that hold rows multiplies each block by its group's weights in place:
  gmm    y  [M, N]    = x[block] @ w[g]         written to the block's rows
  gmm_t  dx [M, K]    = dy[block] @ w[g]^T      written to the block's rows
  tgmm   dw [G, K, N] = Σ over each group's blocks of x[block]^T @ dy[block]
A block reads a window of B consecutive rows of the sorted operand (shifted back to fit inside
the M rows at the end) and keeps only the rows it owns, so the rows are never copied into a
padded buffer and the weights never into per-block copies. Rows past sum(group_sizes) belong to
no block and come out zero. The loop runs only as many blocks as the group sizes need (at most
M/B + G), so none of the static bound's padding blocks costs a matmul. On CPU at moe_tiny's
shapes this is about 3x faster forward than the batched matmul over a padded [NB, B, K] buffer
with gathered [NB, K, N] weights that it replaced, with the same bits (docs/benchmarks.md).
XLA's CPU `ragged_dot`, by contrast, runs at about a tenth of this speed.
"""
import dataclasses

import jax
from jax import lax
import jax.numpy as jnp

# Largest block: the products, and the order of the weight gradient's sum, equal the batched
# matmul's over 128-row blocks that this loop replaced, so results are bitwise unchanged.
_MAX_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """Block b holds rows [block_start[b], min(block_start[b] + B, group_end[block_group[b]]))."""
  block_start: jax.Array  # [NB] int32
  block_group: jax.Array  # [NB] int32
  group_end: jax.Array    # [G] int32: one past each group's last row
  num_used: jax.Array     # [] int32: blocks that hold rows; those past it are not run
  block: int
  num_blocks: int


def block_size(m: int, g: int) -> int:
  """A power of two near the mean group size, at most _MAX_BLOCK and at most m (at least 1)."""
  mean_rows = max(1, -(-m // g))
  return max(1, min(m, _MAX_BLOCK, max(8, 1 << (mean_rows - 1).bit_length())))


def num_blocks(m: int, g: int) -> int:
  """Blocks enough for m rows in g groups, each group cut into blocks of block_size rows."""
  block = block_size(m, g)
  return -(-(m + g * (block - 1)) // block)


def layout(group_sizes: jax.Array, m: int) -> BlockLayout:
  """The block layout of m rows sorted into len(group_sizes) groups."""
  g = group_sizes.shape[0]
  block = block_size(m, g)
  blocks = num_blocks(m, g)
  sizes = group_sizes.astype(jnp.int32)
  ends = jnp.cumsum(sizes)
  group_blocks = -(-sizes // block)
  block_ends = jnp.cumsum(group_blocks)
  index = jnp.arange(blocks, dtype=jnp.int32)
  # Blocks past the last used one are never run; any group will do for them.
  group = jnp.minimum(jnp.searchsorted(block_ends, index, side='right'), g - 1).astype(jnp.int32)
  start = (ends - sizes)[group] + (index - (block_ends - group_blocks)[group]) * block
  return BlockLayout(block_start=start.astype(jnp.int32), block_group=group, group_end=ends,
                     num_used=block_ends[-1].astype(jnp.int32), block=block, num_blocks=blocks)


def _window(lay: BlockLayout, i, m: int):
  """(first row of block i's B-row window, inside [0, m); [B, 1] mask of the rows it owns)."""
  start = lay.block_start[i]
  first = jnp.minimum(start, m - lay.block)
  rows = first + jnp.arange(lay.block, dtype=jnp.int32)
  return first, ((rows >= start) & (rows < lay.group_end[lay.block_group[i]]))[:, None]


def _row_products(a, w, lay: BlockLayout, dims: str):
  """out[rows of block b] = a[rows of b] (einsum dims) w[group of b]; [M, C] -> [M, N]."""
  m = a.shape[0]
  n = w.shape[2] if dims == 'ik,kn->in' else w.shape[1]
  if m == 0:
    return jnp.zeros((0, n), a.dtype)

  def body(i, out):
    first, owned = _window(lay, i, m)
    product = jnp.einsum(dims, lax.dynamic_slice_in_dim(a, first, lay.block),
                         w[lay.block_group[i]], preferred_element_type=jnp.float32)
    kept = lax.dynamic_slice_in_dim(out, first, lay.block)
    return lax.dynamic_update_slice_in_dim(
        out, jnp.where(owned, product.astype(out.dtype), kept), first, 0)

  return lax.fori_loop(0, lay.num_used, body, jnp.zeros((m, n), a.dtype))


def gmm(x, w, lay: BlockLayout):
  """[M, K] x [G, K, N] -> [M, N]."""
  return _row_products(x, w, lay, 'ik,kn->in')


def gmm_t(dy, w, lay: BlockLayout):
  """[M, N] x [G, K, N]^T -> [M, K]."""
  return _row_products(dy, w, lay, 'in,kn->ik')


def tgmm(x, dy, lay: BlockLayout, num_groups: int):
  """x [M, K], dy [M, N] -> [G, K, N] with dw[g] = x_g^T dy_g, accumulated in float32."""
  m, k = x.shape
  n = dy.shape[1]
  zero = jnp.zeros((), x.dtype)

  def body(i, dw):
    first, owned = _window(lay, i, m)
    # Both operands masked: a row another block owns (or no block) must add nothing, inf or not.
    xs = jnp.where(owned, lax.dynamic_slice_in_dim(x, first, lay.block), zero)
    dys = jnp.where(owned, lax.dynamic_slice_in_dim(dy, first, lay.block), zero)
    group = lay.block_group[i]
    product = jnp.einsum('ik,in->kn', xs, dys, preferred_element_type=jnp.float32)
    return lax.dynamic_update_index_in_dim(dw, dw[group] + product, group, 0)

  dw = jnp.zeros((num_groups, k, n), jnp.float32)
  if m:
    dw = lax.fori_loop(0, lay.num_used, body, dw)
  return dw.astype(x.dtype)
