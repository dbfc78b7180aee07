"""Grouped matmuls as batched dense matmuls over padded row blocks, in plain XLA.

Shapes: M rows (sorted by group), K contraction, N output, G groups, B rows per block,
NB blocks (a static bound: every group padded up to a multiple of B fits in NB·B rows).

Each group's rows are copied into whole blocks of B rows (the last block of a group zero-padded,
as in MegaBlocks' block-sparse layout, Gale et al. 2022), every block is tagged with its group,
and one batched matmul multiplies each block by its group's weights. Waste is under B rows per
group, so the FLOPs stay close to the useful ones; XLA's CPU `ragged_dot`, by contrast, runs at
about a third of this speed on moe_tiny's shapes (docs/benchmarks.md). The three products of a
grouped matmul and its gradients share one `BlockLayout`:
  gmm    y  [M, N]    = unblock(blocks(x) @ w[block_group])
  gmm_t  dx [M, K]    = unblock(blocks(dy) @ w[block_group]^T)
  tgmm   dw [G, K, N] = Σ over each group's blocks of blocks(x)^T @ blocks(dy)
Rows past sum(group_sizes) belong to no block and come out zero. The batched matmul reads one
copy of the weights per block (NB·K·N elements), so `reason` turns away shapes where that copy
would be large (the caller then falls back to `jax.lax.ragged_dot`).
"""
import dataclasses

import jax
import jax.numpy as jnp

# Largest block: 128 and 256 rows ran about equally fast on CPU at moe_tiny's shapes (32 and 64
# were 1.7x and 1.1x slower forward+backward), and smaller blocks pad less.
_MAX_BLOCK = 128
# Largest per-block weight copy a product may make: moe_tiny needs 9 MiB; a GPU-sized model on CPU
# would need gigabytes, and XLA's ragged_dot needs none.
_MAX_WEIGHT_COPY_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """Where each row goes in the [NB·B] slots of the blocks, and which row each slot holds."""
  slot: jax.Array         # [M] int32: the slot each row goes to (NB·B: none, a zero row)
  source: jax.Array       # [NB·B] int32: the row each slot holds (M: none, a zero row)
  block_group: jax.Array  # [NB] int32
  block: int
  num_blocks: int

  @property
  def num_slots(self) -> int:
    return self.num_blocks * self.block


def block_size(m: int, g: int) -> int:
  """A power of two near the mean group size, at most _MAX_BLOCK: small for tiny shapes."""
  mean_rows = max(1, -(-m // g))
  return min(_MAX_BLOCK, max(8, 1 << (mean_rows - 1).bit_length()))


def num_blocks(m: int, g: int) -> int:
  """Blocks enough for m rows in g groups, each group padded to whole blocks."""
  block = block_size(m, g)
  return -(-(m + g * (block - 1)) // block)


def reason(m: int, k: int, n: int, g: int, dtype) -> str | None:
  """Why the blocked products should not serve [m, k] x [g, k, n] (None if they should)."""
  copy_bytes = num_blocks(m, g) * k * n * jnp.dtype(dtype).itemsize
  if copy_bytes > _MAX_WEIGHT_COPY_BYTES:
    return (f'its per-block [K, N] weights (or weight gradients) would take '
            f'{copy_bytes / 2**20:.0f} MiB '
            f'(limit {_MAX_WEIGHT_COPY_BYTES / 2**20:.0f} MiB)')
  return None


def layout(group_sizes: jax.Array, m: int) -> BlockLayout:
  """The block layout of m rows sorted into len(group_sizes) groups."""
  g = group_sizes.shape[0]
  block = block_size(m, g)
  blocks = num_blocks(m, g)
  sizes = group_sizes.astype(jnp.int32)
  ends = jnp.cumsum(sizes)
  padded = -(-sizes // block) * block
  padded_ends = jnp.cumsum(padded)
  rows = jnp.arange(m, dtype=jnp.int32)
  group = jnp.searchsorted(ends, rows, side='right').astype(jnp.int32)  # g: past every group
  in_group = jnp.minimum(group, g - 1)
  slot = (padded_ends - padded)[in_group] + rows - (ends - sizes)[in_group]
  slot = jnp.where(group < g, slot, blocks * block)  # past every group: no slot
  # Blocks past the last group's padding hold only zeros; any group will do for them.
  block_starts = jnp.arange(blocks, dtype=jnp.int32) * block
  block_group = jnp.minimum(jnp.searchsorted(padded_ends, block_starts, side='right'), g - 1)
  # The inverse map, so that filling the blocks is a gather (on CPU a scatter into a zeroed
  # buffer costs a broadcast, a copy and the scatter).
  slot_group = jnp.repeat(block_group, block, total_repeat_length=blocks * block)
  offset = jnp.arange(blocks * block, dtype=jnp.int32) - (padded_ends - padded)[slot_group]
  source = jnp.where(offset < sizes[slot_group], (ends - sizes)[slot_group] + offset, m)
  return BlockLayout(slot=slot, source=source.astype(jnp.int32),
                     block_group=block_group.astype(jnp.int32), block=block, num_blocks=blocks)


def _to_blocks(a, lay: BlockLayout):
  """[M, C] -> [NB, B, C], zeros in the padding."""
  rows = jnp.take(a, lay.source, axis=0, mode='fill', fill_value=0)
  return rows.reshape(lay.num_blocks, lay.block, a.shape[1])


def _from_blocks(blocks, lay: BlockLayout):
  """[NB, B, C] -> [M, C]; rows with no slot are zero."""
  flat = blocks.reshape(lay.num_slots, blocks.shape[2])
  return jnp.take(flat, lay.slot, axis=0, mode='fill', fill_value=0)


def gmm(x, w, lay: BlockLayout):
  """[M, K] x [G, K, N] -> [M, N]."""
  y = jnp.einsum('bik,bkn->bin', _to_blocks(x, lay), w[lay.block_group],
                 preferred_element_type=jnp.float32)
  return _from_blocks(y, lay).astype(x.dtype)


def gmm_t(dy, w, lay: BlockLayout):
  """[M, N] x [G, K, N]^T -> [M, K]."""
  dx = jnp.einsum('bin,bkn->bik', _to_blocks(dy, lay), w[lay.block_group],
                  preferred_element_type=jnp.float32)
  return _from_blocks(dx, lay).astype(dy.dtype)


def tgmm(x, dy, lay: BlockLayout, num_groups: int):
  """x [M, K], dy [M, N] -> [G, K, N] with dw[g] = x_g^T dy_g."""
  per_block = jnp.einsum('bik,bin->bkn', _to_blocks(x, lay), _to_blocks(dy, lay),
                         preferred_element_type=jnp.float32)
  dw = jax.ops.segment_sum(per_block, lay.block_group, num_segments=num_groups,
                           indices_are_sorted=True)
  return dw.astype(x.dtype)
