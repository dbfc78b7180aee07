"""Times the MoE layer for every dispatch and grouped-matmul implementation against a dense FFN.

  python experiments/bench_moe.py --json_out=/tmp/bench_moe.json        # H100: the three shapes
  python experiments/bench_moe.py --smoke                               # tiny, CPU, seconds
  python experiments/bench_moe.py --products --ws_sweep                 # H100: kernels alone

Shapes (T, D, F, E, k): T tokens, D d_model, F d_ff per expert, E experts, k top_k. For each shape
and routing ('balanced': the random router as initialised; 'zipf': the router biased so that expert
loads follow Zipf's law) it times, forward and forward+backward:
  roof         one plain matmul [T, D] x [D, 3·k·F]: the same FLOPs as the MoE experts
  dense_ffn    a SwiGLU FFN of width k·F (equal active FLOPs), moe.DenseFFN
  ragged/IMPL  dropless MoE, grouped matmul implementation IMPL ('xla', 'hopper', ...)
  capacity     GShard-style capacity dispatch at --capacity_factor (drops tokens)
  dense        every expert on every token (only below --dense_max_elements)
With --products it times instead the six grouped matmuls of the expert FFN on their own
(forward gmm, input-gradient gmm_t, weight-gradient tgmm, for wi [D, F] and wo [F, D]) on balanced
groups, for each implementation, and the gated first layer `grouped_glu` (glu fwd and fwd+bwd:
paired kernels with 'hopper_ws', separate products otherwise); --ws_sweep adds every tile variant
of the 'hopper_ws' kernels (WS_VARIANTS), to fill hopper.py's tile choice from measurements.
Each product's output is checked against a float32 reference (per-group slices, exact
precision): its relative error is in the row, and a row over MAX_REL_ERR is marked WRONG, so a
fast but wrong tile variant cannot win the sweep.
Useful TFLOP/s count the active expert matmuls only (6·T·k·D·F forward, 3x that forward+backward),
so a dispatch that wastes work (capacity padding, dense) is not credited for it. Each time is the
median of many runs after a warm-up, with the spread (10th-90th percentile) beside it; memory is
the compiled executable's arguments + outputs + temporaries.
"""
import functools
import json
import statistics
import sys
import time

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax import moe as moe_lib
from moejax.kernels import grouped_glu as glu_lib
from moejax.kernels import grouped_matmul as gmm_lib
from moejax.kernels import hopper
from moejax.kernels import hopper_ws

# Issue 5's bound for a bf16 kernel against the reference (relative Frobenius error).
MAX_REL_ERR = 1e-2
SHAPES = ((16384, 2048, 4096, 8, 2), (16384, 2048, 1408, 64, 6), (8192, 4096, 14336, 8, 2))
SMOKE_SHAPES = ((64, 32, 16, 4, 2),)
ROUTINGS = ('balanced', 'zipf')
# (max_concurrent_steps, grid_block_n, tile_n) of the warp-specialized kernels, for --ws_sweep.
WS_VARIANTS = tuple((steps, gbn, tile_n) for steps in (2, 3) for gbn in (1, 4, 8, 16)
                    for tile_n in (128, 64))

_SMOKE = flags.DEFINE_bool('smoke', False, 'Tiny shapes and few repeats (CPU, CI).')
_JSON_OUT = flags.DEFINE_string('json_out', '', 'Write all results here as JSON.')
_SHAPES = flags.DEFINE_list('shapes', [], 'T:D:F:E:k shapes; default: SHAPES, three H100 sizes.')
_ROUTINGS = flags.DEFINE_list('routings', list(ROUTINGS), "'balanced' and/or 'zipf'.")
_IMPLS = flags.DEFINE_list('impls', ['xla', 'hopper', 'hopper_ws'],
                            'Grouped-matmul implementations.')
_DISPATCHES = flags.DEFINE_list('dispatches', ['ragged', 'capacity', 'dense'], 'MoE dispatches.')
_CAPACITY_FACTOR = flags.DEFINE_float('capacity_factor', 1.25, 'For the capacity dispatch.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 2048, 'Tokens per sequence (capacity group).')
_ZIPF = flags.DEFINE_float('zipf_exponent', 1.0, 'Expert e gets load ~ 1 / (e + 1)^s.')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'], 'Params and compute.')
_REPEATS = flags.DEFINE_integer('repeats', 30, 'Most timed runs per case.')
_SECONDS = flags.DEFINE_float('seconds_per_case', 1.0, 'Fewer repeats for slow cases.')
_PRODUCTS = flags.DEFINE_bool('products', False,
                              'Time the grouped-matmul products alone instead of the layer.')
_WS_SWEEP = flags.DEFINE_bool('ws_sweep', False,
                              "With --products: also every 'hopper_ws' tile variant.")
_DENSE_MAX = flags.DEFINE_integer('dense_max_elements', 2**27,
                                  'Skip dense dispatch when E*T*F exceeds this.')


def parse_shape(text: str) -> tuple[int, ...]:
  parts = tuple(int(p) for p in text.split(':'))
  if len(parts) != 5:
    raise ValueError(f'--shapes entries are T:D:F:E:k, got {text!r}')
  return parts


def time_fn(fn, args, repeats: int, seconds: float) -> tuple[dict, object]:
  """(stats, output): median and 10-90 % spread of fn(*args) in ms after two warm-up runs.

  A third, uncounted run sizes the timed ones: as many as fit in `seconds`, 3 to `repeats`.
  """
  compiled = jax.jit(fn).lower(*args).compile()
  memory = compiled.memory_analysis()
  peak = None
  if memory is not None:
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
            + memory.temp_size_in_bytes) / 2**20
  for _ in range(2):
    output = jax.block_until_ready(compiled(*args))
  start = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  first = time.perf_counter() - start
  n = int(min(repeats, max(3, seconds / max(first, 1e-9))))
  times = []
  for _ in range(n):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(1e3 * (time.perf_counter() - start))
  q10, q90 = np.percentile(times, [10, 90])
  stats = dict(ms=statistics.median(times), p10_ms=float(q10), p90_ms=float(q90), runs=n,
               peak_mib=peak)
  return stats, output


def make_tokens(t, d, seq_len, dtype, key):
  """x [T / S, S, D] whose feature 0 is the constant 1, so router kernel row 0 acts as a bias."""
  x = jax.random.normal(key, (t // seq_len, seq_len, d), jnp.float32)
  return x.at[..., 0].set(1.0).astype(dtype)


def router_bias(routing, e):
  """[E] logit bias: zero for 'balanced'; -s·log(e + 1) for 'zipf', probabilities ~ (e + 1)^-s."""
  if routing == 'balanced':
    return jnp.zeros((e,))
  return -_ZIPF.value * jnp.log1p(jnp.arange(e, dtype=jnp.float32))


def bench_layer(name, module, x, params_key, repeats, seconds, flops, router_bias=None):
  """Forward and forward+backward rows for one Linen layer returning (y, aux)."""
  variables = nn.unbox(jax.jit(module.init)(params_key, x))
  if router_bias is not None:
    kernel = variables['params']['router']['kernel']
    variables['params']['router']['kernel'] = kernel.at[0].set(router_bias.astype(kernel.dtype))
  cotangent = jax.random.normal(jax.random.key(7), x.shape, x.dtype)

  def forward(v, x):
    y, aux = module.apply(v, x)
    return y, aux['dropped_fraction'], jnp.max(aux['expert_fraction'])

  def loss(v, x):
    return jnp.sum(module.apply(v, x)[0].astype(jnp.float32) * cotangent)

  rows = []
  common = dict(dropped_fraction=float('nan'), max_expert_fraction=None)
  # value_and_grad: with grad alone XLA would drop the last forward matmul, whose output
  # only the loss value needs.
  for mode, fn, mult in (('fwd', forward, 1), ('fwd+bwd', jax.value_and_grad(loss, (0, 1)), 3)):
    try:
      stats, output = time_fn(fn, (variables, x), repeats, seconds)
    except jax.errors.JaxRuntimeError as e:  # e.g. out of memory: report it, go on
      print(f'{name} {mode} failed: {str(e)[:200]}')
      continue
    if mode == 'fwd':
      common = dict(dropped_fraction=float(output[1]), max_expert_fraction=float(output[2]))
    rows.append(dict(case=name, mode=mode, tflops=mult * flops / stats['ms'] / 1e9, **stats,
                     **common))
  return rows


def bench_roof(t, d, width, dtype, repeats, seconds):
  keys = jax.random.split(jax.random.key(3))
  a = jax.random.normal(keys[0], (t, d), dtype)
  b = jax.random.normal(keys[1], (d, width), dtype)
  flops = 2 * t * d * width
  rows = []
  cotangent = jax.random.normal(keys[0], (t, width), dtype)
  fwd = lambda a, b: a @ b
  # A random cotangent: the gradient of a plain sum would let XLA skip both matmuls.
  bwd = jax.value_and_grad(
      lambda a, b: jnp.sum((a @ b).astype(jnp.float32) * cotangent), (0, 1))
  for mode, fn, mult in (('fwd', fwd, 1), ('fwd+bwd', bwd, 3)):
    stats, _ = time_fn(fn, (a, b), repeats, seconds)
    rows.append(dict(case='roof', mode=mode, tflops=mult * flops / stats['ms'] / 1e9, **stats,
                     dropped_fraction=0.0, max_expert_fraction=None))
  return rows


def run(shapes, routings, impls, dispatches, *, capacity_factor, seq_len, dtype, repeats,
        seconds, dense_max_elements, log=print) -> list[dict]:
  """All cases; returns one dict per (shape, routing, case, mode)."""
  unknown = set(routings) - set(ROUTINGS)
  if unknown:  # checked before any timing: a typo should not cost a shape's worth of runs
    raise ValueError(f'--routings entries must be in {ROUTINGS}, got {sorted(unknown)}')
  results = []
  for (t, d, f, e, k) in shapes:
    s = min(seq_len, t)
    if t % s:
      raise ValueError(f'T={t} must be a multiple of --seq_len={s}')
    flops = 6 * t * k * d * f  # active expert matmuls, forward
    shape = dict(T=t, D=d, F=f, E=e, k=k)
    x = make_tokens(t, d, s, dtype, jax.random.key(0))
    base = bench_roof(t, d, 3 * k * f, dtype, repeats, seconds)
    base += bench_layer('dense_ffn', moe_lib.DenseFFN(k * f, dtype=dtype, param_dtype=dtype), x,
                        jax.random.key(1), repeats, seconds, flops)
    for routing in routings:
      bias = router_bias(routing, e)
      rows = [dict(r, routing=routing) for r in base]
      cases = []
      for dispatch in dispatches:
        if dispatch == 'ragged':
          cases += [(f'ragged/{impl}', dict(dispatch='ragged', gmm_impl=impl)) for impl in impls]
        elif dispatch == 'dense' and e * t * f > dense_max_elements:
          log(f'skip dense dispatch at T={t} E={e} F={f}: E*T*F={e * t * f} > '
              f'--dense_max_elements={dense_max_elements}')
        else:
          cases.append((dispatch, dict(dispatch=dispatch)))
      for name, kwargs in cases:
        module = moe_lib.MoE(e, k, f, capacity_factor=capacity_factor, dtype=dtype,
                             param_dtype=dtype, **kwargs)
        rows += [dict(r, routing=routing) for r in bench_layer(
            name, module, x, jax.random.key(1), repeats, seconds, flops, router_bias=bias)]
      for mode in ('fwd', 'fwd+bwd'):
        dense_ms = next((r['ms'] for r in rows if r['case'] == 'dense_ffn' and r['mode'] == mode),
                        float('nan'))  # nan when the dense FFN itself failed (out of memory)
        for r in rows:
          if r['mode'] == mode:
            r['vs_dense'] = dense_ms / r['ms']
      for r in rows:
        r.update(shape)
        log(format_row(r))
      results += rows
  return results


def _ws_fits(op: str, k: int, n: int, cfg: hopper_ws.WSConfig) -> bool:
  """Whether the 'hopper_ws' kernel with tiles cfg serves op on [M, k] x [G, k, n] unpadded."""
  multiples = hopper.tile_multiples(op, cfg.tile_m, cfg.cta_n, cfg.tile_k)
  return k % multiples['K'] == 0 and n % multiples['N'] == 0


def _ws_variant_fns(op: str, k: int, n: int, group_sizes) -> dict:
  """{name: fn} for each WS_VARIANTS tile choice that serves op unpadded."""
  fns = {}
  for steps, gbn, tile_n in WS_VARIANTS:
    cfg = hopper_ws.WSConfig(tile_n=tile_n, max_concurrent_steps=steps, grid_block_n=gbn)
    if not _ws_fits(op, k, n, cfg):
      continue
    name = f'{op}/ws[s{steps},g{gbn},n{tile_n}]'
    if op == 'tgmm':
      fns[name] = functools.partial(hopper_ws.tgmm, group_sizes=group_sizes, cfg=cfg)
    else:
      fns[name] = functools.partial(hopper_ws.gmm, group_sizes=group_sizes, cfg=cfg,
                                    transpose_rhs=op == 'gmm_t')
  return fns


def sliced_gmm(x, w, group_sizes):
  """Float32 reference grouped matmul: one exact-precision matmul per group of static size.

  Independent of every implementation under test (no ragged_dot); its autodiff gives the
  reference input and weight gradients.
  """
  starts = np.concatenate([[0], np.cumsum(group_sizes)])
  x, w = x.astype(jnp.float32), w.astype(jnp.float32)
  rows = [jnp.matmul(x[a:b], w[g], precision=jax.lax.Precision.HIGHEST)
          for g, (a, b) in enumerate(zip(starts[:-1], starts[1:]))]
  return jnp.concatenate(rows + [jnp.zeros((x.shape[0] - starts[-1], w.shape[2]))])


def rel_err(got, want) -> float:
  """The largest relative Frobenius error ||got - want|| / ||want|| over matching leaves."""
  def one(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
  return max(jax.tree.leaves(jax.tree.map(one, got, want)))


@functools.partial(jax.jit, static_argnums=3)
def _reference_products(x, w, dy, sizes):
  """Float32 (y, dx, dw) of y = x @ w[g] per group, for cotangent dy."""
  y, vjp = jax.vjp(lambda x, w: sliced_gmm(x, w, sizes), x.astype(jnp.float32),
                   w.astype(jnp.float32))
  return (y, *vjp(dy.astype(jnp.float32)))


@functools.partial(jax.jit, static_argnums=4)
def _reference_glu(x, w0, w1, cotangent, sizes):
  """Float32 silu(x w0) * (x w1) per group, and (loss, grads) of its sum against cotangent."""
  def glu(x, w0, w1):
    return jax.nn.silu(sliced_gmm(x, w0, sizes)) * sliced_gmm(x, w1, sizes)

  def loss(x, w0, w1):
    return jnp.sum(glu(x, w0, w1) * cotangent.astype(jnp.float32))

  args = tuple(a.astype(jnp.float32) for a in (x, w0, w1))
  return glu(*args), jax.value_and_grad(loss, (0, 1, 2))(*args)


def bench_products(shape, impls, dtype, repeats, seconds, sweep, log=print) -> list[dict]:
  """Rows for the six grouped matmuls of the expert FFN at shape (T, D, F, E, k), balanced."""
  t, d, f, e, k = shape
  m = t * k
  sizes = (m // e + m % e,) + (m // e,) * (e - 1)  # static: a hashable tuple for the reference
  group_sizes = jnp.asarray(sizes, jnp.int32)
  keys = jax.random.split(jax.random.key(5), 4)
  rows = []

  def record(name, weight, kk, n, fn, args, flops, want):
    try:
      stats, got = time_fn(fn, args, repeats, seconds)
    except (jax.errors.JaxRuntimeError, ValueError) as err:  # out of memory, over smem
      log(f'{weight} {name} failed: {str(err)[:200]}')
      return
    err = rel_err(got, want)
    row = dict(case=name, weight=weight, T=t, D=d, F=f, E=e, k=k, M=m, K=kk, N=n,
               tflops=flops / stats['ms'] / 1e9, rel_err=err, correct=err <= MAX_REL_ERR, **stats)
    log(f"{weight:>3} M={m:<6} K={kk:<6} N={n:<6} E={e:<3} {name:<24} {row['ms']:>8.3f} ms"
        f" ({row['p10_ms']:.3f}-{row['p90_ms']:.3f}) {row['tflops']:>7.1f} TFLOP/s"
        f"  err {err:.1e}{'' if row['correct'] else '  WRONG'}")
    rows.append(row)

  for weight, (kk, n) in (('wi', (d, f)), ('wo', (f, d))):
    x = jax.random.normal(keys[0], (m, kk), dtype)
    w = (jax.random.normal(keys[1], (e, kk, n)) / np.sqrt(kk)).astype(dtype)
    dy = jax.random.normal(keys[2], (m, n), dtype)
    args = {'gmm': (x, w), 'gmm_t': (dy, w), 'tgmm': (x, dy)}
    y, dx, dw = _reference_products(x, w, dy, sizes)
    wants = {'gmm': y, 'gmm_t': dx, 'tgmm': dw}
    fns = {}
    for impl in impls:
      impl = gmm_lib.resolve_impl(impl)
      fns[f'gmm/{impl}'] = functools.partial(gmm_lib.forward_product, group_sizes=group_sizes,
                                             impl=impl)
      fns[f'gmm_t/{impl}'] = functools.partial(gmm_lib.input_grad_product,
                                               group_sizes=group_sizes, impl=impl)
      fns[f'tgmm/{impl}'] = functools.partial(gmm_lib.weight_grad_product,
                                              group_sizes=group_sizes, impl=impl)
    if sweep and hopper.platform_reason() is None:
      for op in args:
        fns.update(_ws_variant_fns(op, kk, n, group_sizes))
    for name, fn in fns.items():
      op = name.split('/')[0]
      record(name, weight, kk, n, fn, args[op], 2 * m * kk * n, wants[op])
    del y, dx, dw, wants  # the float32 references take more memory than the products

  # The gated layer act(x wi_0) * (x wi_1): two products forward, six forward+backward.
  x = jax.random.normal(keys[0], (m, d), dtype)
  w0, w1 = ((jax.random.normal(key, (e, d, f)) / np.sqrt(d)).astype(dtype) for key in keys[1:3])
  cotangent = jax.random.normal(keys[3], (m, f), dtype)

  want_glu, want_grads = _reference_glu(x, w0, w1, cotangent, sizes)
  for impl in impls:
    impl = gmm_lib.resolve_impl(impl)
    glu = functools.partial(glu_lib.grouped_glu, group_sizes=group_sizes,
                            activation=jax.nn.silu, impl=impl)
    loss = lambda x, w0, w1, glu=glu: jnp.sum(glu(x, w0, w1).astype(jnp.float32) * cotangent)
    record(f'glu/{impl}', 'wi', d, f, glu, (x, w0, w1), 4 * m * d * f, want_glu)
    record(f'glu_fwd+bwd/{impl}', 'wi', d, f, jax.value_and_grad(loss, (0, 1, 2)), (x, w0, w1),
           12 * m * d * f, want_grads)
  return rows


HEADER = (f"{'T':>6} {'D':>5} {'F':>6} {'E':>3} {'k':>2} {'routing':>8} {'case':<14} {'mode':<8}"
          f" {'ms':>9} {'p10-p90':>15} {'TFLOP/s':>8} {'vs dense':>8} {'dropped':>7}"
          f" {'max load':>8} {'MiB':>8}")


def format_row(r: dict) -> str:
  load = '' if r['max_expert_fraction'] is None else f"{r['max_expert_fraction']:.3f}"
  mib = '' if r['peak_mib'] is None else f"{r['peak_mib']:.0f}"
  return (f"{r['T']:>6} {r['D']:>5} {r['F']:>6} {r['E']:>3} {r['k']:>2} {r['routing']:>8}"
          f" {r['case']:<14} {r['mode']:<8} {r['ms']:>9.3f}"
          f" {r['p10_ms']:>7.3f}-{r['p90_ms']:<7.3f} {r['tflops']:>8.1f} {r['vs_dense']:>8.2f}"
          f" {r['dropped_fraction']:>7.3f} {load:>8} {mib:>8}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _SMOKE.value:
    shapes, repeats, seconds, dtype = SMOKE_SHAPES, 3, 0.05, jnp.float32
    seq_len = 32
  else:
    shapes = tuple(parse_shape(s) for s in _SHAPES.value) or SHAPES
    repeats, seconds, seq_len = _REPEATS.value, _SECONDS.value, _SEQ_LEN.value
    dtype = jnp.dtype(_DTYPE.value)
  device = jax.devices()[0]
  info = dict(device=device.device_kind, platform=device.platform, jax=jax.__version__,
              date=time.strftime('%Y-%m-%d'), command=' '.join(sys.argv))
  print(f"{info['device']} ({info['platform']}), jax {info['jax']}, {info['date']}")
  if not _PRODUCTS.value:
    print(HEADER)
  results = []
  for shape in shapes:  # the JSON is rewritten after each shape, so a cut-off run keeps its rows
    if _PRODUCTS.value:
      results += bench_products(shape, _IMPLS.value, dtype, repeats, seconds, _WS_SWEEP.value)
    else:
      results += run([shape], _ROUTINGS.value, _IMPLS.value, _DISPATCHES.value,
                     capacity_factor=_CAPACITY_FACTOR.value, seq_len=seq_len, dtype=dtype,
                     repeats=repeats, seconds=seconds, dense_max_elements=_DENSE_MAX.value)
    if _JSON_OUT.value:
      with open(_JSON_OUT.value, 'w') as fh:
        json.dump(dict(info, results=results), fh, indent=1)
  if _JSON_OUT.value:
    logging.info('wrote %s', _JSON_OUT.value)


if __name__ == '__main__':
  app.run(main)
