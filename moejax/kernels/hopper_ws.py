"""moejax's own Hopper grouped matmuls: warp-specialized, two consumer warpgroups per CTA.

Shapes: M rows (token slots sorted by group), K contraction of the forward, N output of the forward,
G groups (experts).

Why: the stock kernels in `hopper.py` run one warpgroup on a 128x128 tile and reach 460-600
TFLOP/s on an H100, against ~700 for cuBLAS (docs/gpu_kernel_notes.md). JAX's dense
`hopper_matmul_mgpu` closes that gap with a producer warpgroup that only issues TMA loads and two
consumer warpgroups that share each loaded tile (a 128x256 CTA tile): twice the math per byte of
shared memory, and one consumer's wgmma hides the other's wait. These kernels apply that layout to
the grouped products:

  gmm(transpose_rhs=False)  y  [M, N] = x  [M, K] @ w[g]   [K, N]
  gmm(transpose_rhs=True)   dx [M, K] = dy [M, N] @ w[g]^T [N, K]
  tgmm                      dw [G, K, N] = x_g^T [K, M_g] @ dy_g [M_g, N]

Both consumers work on the same rows and split the CTA's columns, so in `gmm` they share one row
range and one group. A row tile can straddle two groups; it is then computed once per group and
each pass stores only its group's rows (`_RowTile`). `tgmm` reduces over each group's rows and
zeroes, in each consumer's own half of the dy tile, the rows of neighbouring groups.

Status: checked on CPU with the Mosaic-GPU interpreter (jax >= 0.11) and by lowering for CUDA, not
yet timed on a GPU; `grouped_matmul` serves them as impl='hopper_ws' and 'auto' does not pick
them until they are measured (docs/gpu_kernel_notes.md).
"""
import dataclasses
import functools
import math

import jax
from jax import lax
import jax.numpy as jnp

_NUM_CONSUMERS = 2
# A producer warpgroup only issues TMA copies; JAX's dense Hopper matmul gives it 40 registers.
_PRODUCER_REGISTERS = 40


@dataclasses.dataclass(frozen=True)
class WSConfig:
  """Per-consumer tile (tile_m x tile_n, tile_k deep); the CTA tile is tile_m x 2*tile_n."""
  tile_m: int = 128
  tile_n: int = 128
  tile_k: int = 64
  max_concurrent_steps: int = 3
  grid_block_n: int = 4

  @property
  def cta_n(self) -> int:
    return _NUM_CONSUMERS * self.tile_n


@dataclasses.dataclass(frozen=True)
class _RowTile:
  """Which group a linear row-tile id serves and which of its rows belong to that group.

  Row tiles are numbered so that a tile straddling a group boundary appears once per group:
  group i owns the ids [first_block_i + i, last_block_i + 1 + i), so there are at most
  cdiv(M, tile_m) + G - 1 ids. Ids that no group owns come out with `size == 0`.
  """
  group: jax.Array
  block: jax.Array
  first_row: jax.Array  # within the tile
  size: jax.Array

  @classmethod
  def find(cls, group_sizes_ref, num_groups: int, tile_m: int, tile_id):
    zero = jnp.int32(0)
    group, block, group_start, group_end = zero, zero, zero, zero
    end = zero
    # G is small and static: an unrolled chain of selects beats a search with branches.
    for i in range(num_groups):
      start, end = end, end + group_sizes_ref[i]
      first_block = lax.div(start, jnp.int32(tile_m))
      last_block = lax.div(jnp.maximum(end - 1, start), jnp.int32(tile_m))
      mine = (first_block + i <= tile_id) & (tile_id <= last_block + i)
      group = lax.select(mine, jnp.int32(i), group)
      block = lax.select(mine, tile_id - i, block)
      group_start = lax.select(mine, start, group_start)
      group_end = lax.select(mine, end, group_end)
    tile_start = block * tile_m
    lo = jnp.maximum(group_start, tile_start)
    hi = jnp.minimum(group_end, tile_start + tile_m)
    return cls(group=group, block=block, first_row=lo - tile_start,
               size=jnp.maximum(hi - lo, 0))


def _swizzled(plgpu, dtype, minor_elems: int):
  swizzle = plgpu.find_swizzle(minor_elems * jnp.dtype(dtype).itemsize * 8)
  elems = swizzle // jnp.dtype(dtype).itemsize
  return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))


def _store_rows(plgpu, pl, src_smem, dst_gmem, first_row, size, max_rows: int):
  """Copy rows [first_row, first_row + size) of src to the same rows of dst (size <= max_rows).

  TMA boxes have static shapes, so the dynamic row count is written as a sum of powers of two,
  one static-size copy per set bit.
  """
  row = first_row
  bit = 1 << int(math.log2(max_rows))
  while bit:
    @pl.when(size & bit != 0)
    def _():
      plgpu.copy_smem_to_gmem(src_smem.at[pl.ds(row, bit)], dst_gmem.at[pl.ds(row, bit)])
    row = row + (size & bit)
    bit //= 2


def _compiler_params(plgpu):
  return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


def num_sms() -> int:
  device = jax.devices()[0]
  return getattr(device, 'core_count', None) or 132


def gmm(lhs, rhs, group_sizes, *, cfg: WSConfig = WSConfig(), transpose_rhs: bool = False,
        sms: int | None = None):
  """lhs [M, K] x rhs [G, K, N] (or [G, N, K] with transpose_rhs) -> [M, N] in lhs.dtype.

  Wants K % tile_k == 0 and N % (2 * tile_n) == 0; rows past sum(group_sizes) are not written.
  """
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  m, k = lhs.shape
  g = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  k_rhs = rhs.shape[2] if transpose_rhs else rhs.shape[1]
  if lhs.dtype != rhs.dtype or k != k_rhs:
    raise ValueError(f'gmm wants matching dtypes and K, got {lhs.shape} {lhs.dtype} and '
                     f'{rhs.shape} {rhs.dtype} (transpose_rhs={transpose_rhs})')
  if k % cfg.tile_k or n % cfg.cta_n:
    raise ValueError(f'gmm wants K % {cfg.tile_k} == 0 and N % {cfg.cta_n} == 0, got K={k} N={n}')
  dtype = lhs.dtype
  m_tiles = pl.cdiv(m, cfg.tile_m) + g - 1
  n_tiles = n // cfg.cta_n
  transforms = _swizzled(plgpu, dtype, cfg.tile_k)
  rhs_block = (cfg.cta_n, cfg.tile_k) if transpose_rhs else (cfg.tile_k, cfg.cta_n)

  def pipeline(step, compute_context):
    return plgpu.emit_pipeline_warp_specialized(
        step,
        grid=(k // cfg.tile_k,),
        memory_registers=_PRODUCER_REGISTERS,
        in_specs=[
            plgpu.BlockSpec((cfg.tile_m, cfg.tile_k), lambda kk: (0, kk), transforms=transforms,
                            memory_space=plgpu.SMEM),
            plgpu.BlockSpec(rhs_block, (lambda kk: (0, kk)) if transpose_rhs else
                            (lambda kk: (kk, 0)), transforms=transforms, memory_space=plgpu.SMEM),
        ],
        wg_axis='wg',
        num_compute_wgs=_NUM_CONSUMERS,
        max_concurrent_steps=cfg.max_concurrent_steps,
        compute_context=compute_context,
    )

  def kernel(sizes_gmem, lhs_gmem, rhs_gmem, out_gmem):
    unused = lambda *_, **__: None

    @functools.partial(
        pl.run_scoped,
        allocations=pipeline(unused, unused).get_allocations(lhs_gmem, rhs_gmem.at[0]),
        out_smem=plgpu.SMEM((_NUM_CONSUMERS, cfg.tile_m, cfg.tile_n), dtype),
        collective_axes='wg',
    )
    def _(allocations, out_smem):
      wg = lax.axis_index('wg')
      wg_cols = pl.ds(wg * cfg.tile_n, cfg.tile_n)

      @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes='sm')
      def _(loop_info):
        mi, ni = plgpu.planar_snake(loop_info.index[0], (m_tiles, n_tiles), 1, cfg.grid_block_n)
        tile = _RowTile.find(sizes_gmem, g, cfg.tile_m, mi)
        rows = pl.ds(tile.block * cfg.tile_m, cfg.tile_m)
        cols = pl.ds(ni * cfg.cta_n, cfg.cta_n)

        def compute_context(run_pipeline):
          @functools.partial(pl.run_scoped, acc=plgpu.ACC((cfg.tile_m, cfg.tile_n), jnp.float32))
          def _(acc):
            run_pipeline(acc)
            result = acc[...].astype(dtype)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's store has read it
            out_smem[wg] = result
            plgpu.commit_smem()
            _store_rows(plgpu, pl, out_smem.at[wg], out_gmem.at[rows, cols].at[:, wg_cols],
                        tile.first_row, tile.size, cfg.tile_m)

        def step(_, lhs_smem, rhs_smem, acc):
          if transpose_rhs:
            plgpu.wgmma(acc, lhs_smem, rhs_smem.at[wg_cols].transpose((1, 0)))
          else:
            plgpu.wgmma(acc, lhs_smem, rhs_smem.at[:, wg_cols])
          # The two consumers alternate on the tensor cores, so waiting here costs nothing and
          # frees this stage's buffers for the producer.
          plgpu.wgmma_wait(0)
          return acc

        rhs_tile = rhs_gmem.at[tile.group, cols, :] if transpose_rhs else rhs_gmem.at[
            tile.group, :, cols]

        @pl.when(tile.size > 0)  # ids that no group owns, and empty groups
        def _():
          pipeline(step, compute_context)(lhs_gmem.at[rows, :], rhs_tile, allocations=allocations)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  call = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((m, n), dtype),
      grid=(sms or num_sms(),),
      grid_names=('sm',),
      num_threads=_NUM_CONSUMERS + 1,
      thread_name='wg',
      compiler_params=_compiler_params(plgpu),
  )
  return call(group_sizes.astype(jnp.int32), lhs, rhs)


def tgmm(lhs, rhs, group_sizes, *, rhs1=None, cfg: WSConfig = WSConfig(),
         sms: int | None = None):
  """lhs [M, K], rhs [M, N] -> [G, K, N] with out[g] = lhs_g^T rhs_g, in lhs.dtype.

  Here tile_m tiles the output rows (K) and tile_k the reduced rows (M). The consumers split a
  tile_m x 2*tile_n output tile; with rhs1 (paired: the weight gradients of a gated layer, which
  share lhs = x) each consumer instead computes one of lhs^T rhs and lhs^T rhs1 on the same
  tile_m x tile_n tile, and the result is the pair of both. Wants K % tile_m == 0 and N a multiple
  of the column tile; empty groups give zeros.
  """
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  paired = rhs1 is not None
  m, k = lhs.shape
  n = rhs.shape[1]
  g = group_sizes.shape[0]
  if lhs.dtype != rhs.dtype or rhs.shape[0] != m or (
      paired and (rhs1.shape != rhs.shape or rhs1.dtype != rhs.dtype)):
    second = f', {rhs1.shape} {rhs1.dtype}' if paired else ''
    raise ValueError(f'tgmm wants matching dtypes and rows, got {lhs.shape} {lhs.dtype} and '
                     f'{rhs.shape} {rhs.dtype}{second}')
  col_tile = cfg.tile_n if paired else cfg.cta_n
  if k % cfg.tile_m or n % col_tile:
    raise ValueError(f'tgmm wants K % {cfg.tile_m} == 0 and N % {col_tile} == 0, got K={k} N={n}')
  dtype = lhs.dtype
  k_tiles, n_tiles = k // cfg.tile_m, n // col_tile
  transforms = _swizzled(plgpu, dtype, 64)
  sizes = group_sizes.astype(jnp.int32)
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  rhs_spec = plgpu.BlockSpec((cfg.tile_k, col_tile), lambda r: (r, 0), transforms=transforms,
                             memory_space=plgpu.SMEM)

  def pipeline(step, compute_context, num_steps):
    return plgpu.emit_pipeline_warp_specialized(
        step,
        grid=(num_steps,),
        memory_registers=_PRODUCER_REGISTERS,
        in_specs=[
            plgpu.BlockSpec((cfg.tile_k, cfg.tile_m), lambda r: (r, 0), transforms=transforms,
                            memory_space=plgpu.SMEM),
            rhs_spec,
        ] + ([rhs_spec] if paired else []),
        wg_axis='wg',
        num_compute_wgs=_NUM_CONSUMERS,
        max_concurrent_steps=cfg.max_concurrent_steps,
        compute_context=compute_context,
    )

  def kernel(starts_gmem, ends_gmem, lhs_gmem, *rhs_and_out_gmems):
    rhs_gmems = rhs_and_out_gmems[:2 if paired else 1]
    out_gmems = rhs_and_out_gmems[len(rhs_gmems):]
    unused = lambda *_, **__: None

    @functools.partial(
        pl.run_scoped,
        # Any static grid of at least max_concurrent_steps gives the buffers of a dynamic one.
        allocations=pipeline(unused, unused, cfg.max_concurrent_steps).get_allocations(
            lhs_gmem, *rhs_gmems),
        out_smem=plgpu.SMEM((_NUM_CONSUMERS, cfg.tile_m, cfg.tile_n), dtype,
                            transforms=transforms),
        collective_axes='wg',
    )
    def _(allocations, out_smem):
      wg = lax.axis_index('wg')

      def for_this_consumer(fn, *per_consumer):
        """fn(this consumer's element of each per_consumer tuple)."""
        for c in range(_NUM_CONSUMERS):
          pl.when(wg == c)(lambda c=c: fn(*(items[c] for items in per_consumer)))

      @plgpu.nd_loop((g, k_tiles * n_tiles), collective_axes='sm')
      def _(loop_info):
        gi = loop_info.index[0]
        ki, ni = plgpu.planar_snake(loop_info.index[1], (k_tiles, n_tiles), 1, cfg.grid_block_n)
        start, end = starts_gmem[gi], ends_gmem[gi]
        first_block = lax.div(start, jnp.int32(cfg.tile_k))
        # An empty group still takes one fully masked step, so its output tile is written (zeros).
        num_steps = jnp.maximum(pl.cdiv(end, cfg.tile_k) - first_block, 1)
        first_row = pl.multiple_of(first_block * cfg.tile_k, cfg.tile_k)
        # Static length M from a dynamic start: the pipeline reads only num_steps blocks of it.
        group_rows = pl.ds(first_row, m)
        out_rows = pl.ds(ki * cfg.tile_m, cfg.tile_m)
        cols = pl.ds(ni * col_tile, col_tile)
        # Where each consumer's tile goes: a column half of one output, or all of its own output.
        destinations = tuple(
            out_gmems[c].at[gi, out_rows, cols] if paired else
            out_gmems[0].at[gi, out_rows, cols].at[:, pl.ds(c * cfg.tile_n, cfg.tile_n)]
            for c in range(_NUM_CONSUMERS))

        def compute_context(run_pipeline):
          @functools.partial(pl.run_scoped, acc=plgpu.ACC((cfg.tile_m, cfg.tile_n), jnp.float32))
          def _(acc):
            run_pipeline(acc)
            result = acc[...].astype(dtype)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            out_smem[wg] = result
            plgpu.commit_smem()
            for_this_consumer(plgpu.copy_smem_to_gmem,
                              tuple(out_smem.at[c] for c in range(_NUM_CONSUMERS)), destinations)

        def step(idx, lhs_smem, *rhs_and_acc):
          (r,) = idx
          *rhs_smems, acc = rhs_and_acc
          mine = tuple(rhs_smems) if paired else tuple(
              rhs_smems[0].at[:, pl.ds(c * cfg.tile_n, cfg.tile_n)] for c in range(_NUM_CONSUMERS))

          def consume(rhs_tile):
            # Edge blocks hold rows of the neighbouring groups: zero them in this consumer's own
            # rhs tile (the lhs tile is shared with the other consumer).
            @pl.when((r == 0) | (r == num_steps - 1))
            def _():
              row = first_row + r * cfg.tile_k + plgpu.layout_cast(
                  lax.broadcasted_iota(jnp.int32, (cfg.tile_k, cfg.tile_n), 0),
                  plgpu.Layout.WGMMA)
              keep = (row >= start) & (row < end)
              # A select, not a multiply: rows outside the group may hold anything, NaN included.
              rhs_tile[...] = jnp.where(keep, rhs_tile[...], jnp.zeros((), dtype))
              plgpu.commit_smem()

            plgpu.wgmma(acc, lhs_smem.transpose((1, 0)), rhs_tile)

          for_this_consumer(consume, mine)
          plgpu.wgmma_wait(0)
          return acc

        pipeline(step, compute_context, num_steps)(
            lhs_gmem.at[group_rows, out_rows], *(r.at[group_rows, cols] for r in rhs_gmems),
            allocations=allocations)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  call = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((g, k, n), dtype),) * (2 if paired else 1),
      grid=(sms or num_sms(),),
      grid_names=('sm',),
      num_threads=_NUM_CONSUMERS + 1,
      thread_name='wg',
      compiler_params=_compiler_params(plgpu),
  )
  outs = call(starts, ends, lhs, rhs, *([rhs1] if paired else []))
  return tuple(outs) if paired else outs[0]


def gmm_pair(lhs0, rhs0, rhs1, group_sizes, *, lhs1=None, epilogue: str, activation=None,
             cfg: WSConfig = WSConfig(), transpose_rhs: bool = False, sms: int | None = None):
  """Two grouped matmuls on the same output tile, one per consumer, combined in the epilogue.

  Consumer c computes p_c = lhs_c @ rhs_c[g] ([M, K] x [G, K, N], or [G, N, K] with
  transpose_rhs) for one tile_m x tile_n output tile; lhs1 defaults to lhs0, which is then loaded
  once for both. The epilogue:
    'sum'  -> p0 + p1 [M, N]: the input gradient of a gated FFN, dx = dh0 w0^T + dh1 w1^T, without
              two [M, K] partial results in HBM and the add that reads them back.
    'glu'  -> (p0, p1, activation(p0) * p1), each [M, N]: the gated FFN's first layer with the
              activation fused (p0 and p1 are kept for the backward pass).
  Each p_c is rounded to lhs0.dtype before it is combined, as the unfused products are. Wants
  K % tile_k == 0 and N % tile_n == 0; rows past sum(group_sizes) are not written.
  """
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  if epilogue not in ('sum', 'glu') or (epilogue == 'glu') != (activation is not None):
    raise ValueError(f"epilogue must be 'sum', or 'glu' with an activation; got {epilogue!r}")
  shared_lhs = lhs1 is None
  lhs1 = lhs0 if shared_lhs else lhs1
  m, k = lhs0.shape
  g = rhs0.shape[0]
  n = rhs0.shape[1] if transpose_rhs else rhs0.shape[2]
  k_rhs = rhs0.shape[2] if transpose_rhs else rhs0.shape[1]
  dtype = lhs0.dtype
  if (lhs1.shape != lhs0.shape or rhs1.shape != rhs0.shape or k != k_rhs
      or {lhs1.dtype, rhs0.dtype, rhs1.dtype} != {dtype}):
    raise ValueError(f'gmm_pair wants matching shapes and dtypes, got lhs {lhs0.shape} '
                     f'{lhs1.shape}, rhs {rhs0.shape} {rhs1.shape} (transpose_rhs={transpose_rhs})')
  if k % cfg.tile_k or n % cfg.tile_n:
    raise ValueError(f'gmm_pair wants K % {cfg.tile_k} == 0 and N % {cfg.tile_n} == 0, '
                     f'got K={k} N={n}')
  m_tiles = pl.cdiv(m, cfg.tile_m) + g - 1
  n_tiles = n // cfg.tile_n
  transforms = _swizzled(plgpu, dtype, cfg.tile_k)
  lhs_spec = plgpu.BlockSpec((cfg.tile_m, cfg.tile_k), lambda kk: (0, kk), transforms=transforms,
                             memory_space=plgpu.SMEM)
  rhs_spec = plgpu.BlockSpec(
      (cfg.tile_n, cfg.tile_k) if transpose_rhs else (cfg.tile_k, cfg.tile_n),
      (lambda kk: (0, kk)) if transpose_rhs else (lambda kk: (kk, 0)),
      transforms=transforms, memory_space=plgpu.SMEM)
  in_specs = [lhs_spec, rhs_spec, rhs_spec] + ([] if shared_lhs else [lhs_spec])
  num_outputs = 3 if epilogue == 'glu' else 1
  # 'sum' exchanges p1 through one buffer; 'glu' stores p0 and p1 from their own buffers.
  num_buffers = 2 if epilogue == 'glu' else 1

  def pipeline(step, compute_context):
    return plgpu.emit_pipeline_warp_specialized(
        step,
        grid=(k // cfg.tile_k,),
        memory_registers=_PRODUCER_REGISTERS,
        in_specs=in_specs,
        wg_axis='wg',
        num_compute_wgs=_NUM_CONSUMERS,
        max_concurrent_steps=cfg.max_concurrent_steps,
        compute_context=compute_context,
    )

  def kernel(sizes_gmem, lhs0_gmem, rhs0_gmem, rhs1_gmem, lhs1_gmem, *out_gmems):
    unused = lambda *_, **__: None
    operands = (lhs0_gmem, rhs0_gmem.at[0], rhs1_gmem.at[0]) + (
        () if shared_lhs else (lhs1_gmem,))

    @functools.partial(
        pl.run_scoped,
        allocations=pipeline(unused, unused).get_allocations(*operands),
        buffers=plgpu.SMEM((num_buffers, cfg.tile_m, cfg.tile_n), dtype),
        consumers_meet=plgpu.Barrier(num_arrivals=_NUM_CONSUMERS),
        collective_axes='wg',
    )
    def _(allocations, buffers, consumers_meet):
      wg = lax.axis_index('wg')

      def meet():
        plgpu.barrier_arrive(consumers_meet)
        plgpu.barrier_wait(consumers_meet)

      @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes='sm')
      def _(loop_info):
        mi, ni = plgpu.planar_snake(loop_info.index[0], (m_tiles, n_tiles), 1, cfg.grid_block_n)
        tile = _RowTile.find(sizes_gmem, g, cfg.tile_m, mi)
        rows = pl.ds(tile.block * cfg.tile_m, cfg.tile_m)
        cols = pl.ds(ni * cfg.tile_n, cfg.tile_n)

        def store(buffer, out_gmem):
          _store_rows(plgpu, pl, buffer, out_gmem.at[rows, cols], tile.first_row, tile.size,
                      cfg.tile_m)

        def compute_context(run_pipeline):
          @functools.partial(pl.run_scoped, acc=plgpu.ACC((cfg.tile_m, cfg.tile_n), jnp.float32))
          def _(acc):
            run_pipeline(acc)
            product = acc[...].astype(dtype)
            # The last tile's stores have read the buffers, and the other consumer is done
            # with them too.
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            meet()
            if epilogue == 'sum':
              @pl.when(wg == 1)
              def _():
                buffers[0] = product
                plgpu.commit_smem()
              meet()

              @pl.when(wg == 0)
              def _():
                total = product.astype(jnp.float32) + buffers[0].astype(jnp.float32)
                buffers[0] = total.astype(dtype)
                plgpu.commit_smem()
                store(buffers.at[0], out_gmems[0])
            else:
              buffers[wg] = product
              plgpu.commit_smem()
              for c in range(_NUM_CONSUMERS):  # p_c goes out from consumer c's own buffer
                pl.when(wg == c)(lambda c=c: store(buffers.at[c], out_gmems[c]))
              meet()

              @pl.when(wg == 0)
              def _():
                gated = activation(product.astype(jnp.float32)) * buffers[1].astype(jnp.float32)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # p0's store has read buffer 0
                buffers[0] = gated.astype(dtype)
                plgpu.commit_smem()
                store(buffers.at[0], out_gmems[2])
            # A consumer overwrites a buffer only after the next tile's first meet(), which the
            # other consumer reaches once it is done reading.

        def step(_, *refs):
          lhs0_smem, rhs0_smem, rhs1_smem = refs[:3]
          lhs1_smem = lhs0_smem if shared_lhs else refs[3]
          acc = refs[-1]
          take = (lambda r: r.transpose((1, 0))) if transpose_rhs else (lambda r: r)

          @pl.when(wg == 0)
          def _():
            plgpu.wgmma(acc, lhs0_smem, take(rhs0_smem))

          @pl.when(wg == 1)
          def _():
            plgpu.wgmma(acc, lhs1_smem, take(rhs1_smem))

          plgpu.wgmma_wait(0)
          return acc

        @pl.when(tile.size > 0)
        def _():
          rhs_tile = lambda r: r.at[tile.group, cols, :] if transpose_rhs else r.at[
              tile.group, :, cols]
          pipeline(step, compute_context)(
              lhs0_gmem.at[rows, :], rhs_tile(rhs0_gmem), rhs_tile(rhs1_gmem),
              *(() if shared_lhs else (lhs1_gmem.at[rows, :],)),
              allocations=allocations)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  call = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((m, n), dtype),) * num_outputs,
      grid=(sms or num_sms(),),
      grid_names=('sm',),
      num_threads=_NUM_CONSUMERS + 1,
      thread_name='wg',
      compiler_params=_compiler_params(plgpu),
  )
  outs = call(group_sizes.astype(jnp.int32), lhs0, rhs0, rhs1, lhs1)
  return outs[0] if epilogue == 'sum' else tuple(outs)
