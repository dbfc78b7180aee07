"""Device check 1: kernel signatures, correctness of hopper wrappers, small block sweep."""
import inspect, json, os, sys, time, statistics, dataclasses, traceback
import numpy as np
import jax, jax.numpy as jnp
OUT = os.environ.get('OUT', '/tmp')
print('jax', jax.__version__, jax.devices(), getattr(jax.devices()[0], 'compute_capability', None), flush=True)
from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu as R, transposed_ragged_dot_mgpu as TR
print('ragged_dot', inspect.signature(R.ragged_dot))
print('transposed', inspect.signature(TR.transposed_ragged_dot))
open(f'{OUT}/ragged_dot_mgpu.py', 'w').write(inspect.getsource(R))
open(f'{OUT}/transposed_ragged_dot_mgpu.py', 'w').write(inspect.getsource(TR))
from moejax.kernels import hopper
from moejax.kernels.grouped_matmul import grouped_matmul, _TGMM_DIMS
print('platform_reason', hopper.platform_reason(), flush=True)

def rel(a, b):
  a = np.asarray(a, np.float32); b = np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

def sizes(key, m, g, mode):
  if mode == 'empty':
    p = np.ones(g); p[::2] = 0
  elif mode == 'skew':
    p = 1.0 / np.arange(1, g + 1) ** 1.5
  else:
    p = np.ones(g)
  tot = m if mode != 'tail' else m - 37
  s = np.floor(p / p.sum() * tot).astype(np.int32); s[np.argmax(p)] += tot - s.sum()
  return jnp.asarray(s)

res = []
for (m, k, n, g, mode) in [(512, 256, 256, 4, 'bal'), (1000, 192, 320, 8, 'empty'), (777, 128, 1408, 16, 'skew'),
                           (640, 130, 200, 3, 'tail'), (2048, 2048, 1408, 64, 'skew'), (256, 64, 64, 8, 'tail')]:
  ks = jax.random.split(jax.random.key(m + k), 3)
  x = jax.random.normal(ks[0], (m, k), jnp.bfloat16)
  w = (jax.random.normal(ks[1], (g, k, n), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
  dy = jax.random.normal(ks[2], (m, n), jnp.bfloat16)
  gs = sizes(ks[0], m, g, mode)
  x32, w32, dy32 = x.astype(jnp.float32), w.astype(jnp.float32), dy.astype(jnp.float32)
  ry = jax.lax.ragged_dot(x32, w32, gs)
  rdx = jax.lax.ragged_dot(dy32, jnp.swapaxes(w32, 1, 2), gs)
  rdw = jax.lax.ragged_dot_general(x32, dy32, gs, _TGMM_DIMS)
  row = dict(m=m, k=k, n=n, g=g, mode=mode,
             reasons=[hopper.gmm_reason(m, k, n, x.dtype), hopper.gmm_t_reason(m, k, n, x.dtype), hopper.tgmm_reason(m, k, n, x.dtype)])
  try:
    y, vjp = jax.vjp(lambda a, b: grouped_matmul(a, b, gs, impl='hopper'), x, w)
    dx, dw = vjp(dy)
    row.update(y=rel(y, ry), dx=rel(dx, rdx), dw=rel(dw, rdw),
               nan=bool(jnp.isnan(y).any() | jnp.isnan(dx).any() | jnp.isnan(dw).any()))
    # Rows past the sum must be exactly zero.
    tot = int(gs.sum())
    row['tail_zero'] = bool((np.asarray(y[tot:], np.float32) == 0).all() and (np.asarray(dx[tot:], np.float32) == 0).all())
  except Exception as e:
    row['error'] = repr(e)[:800]
    traceback.print_exc()
  print(row, flush=True)
  res.append(row)
json.dump(res, open(f'{OUT}/correct.json', 'w'), indent=1)

def bench(f, *args, n=20):
  f = jax.jit(f)
  out = f(*args); jax.block_until_ready(out)
  out = f(*args); jax.block_until_ready(out)
  ts = []
  for _ in range(n):
    t = time.perf_counter(); jax.block_until_ready(f(*args)); ts.append(time.perf_counter() - t)
  return statistics.median(ts)

from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu as R, transposed_ragged_dot_mgpu as TR
t0 = time.time()
sweep = []
shapes = [(32768, 2048, 4096, 8), (32768, 4096, 2048, 8), (98304, 2048, 1408, 64), (98304, 1408, 2048, 64), (16384, 4096, 14336, 8), (16384, 14336, 4096, 8)]
cands = [dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=g) for g in (1, 4, 8)] + \
        [dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=5, grid_block_n=4),
         dict(block_m=64, block_n=256, block_k=64, max_concurrent_steps=4, grid_block_n=4),
         dict(block_m=128, block_n=192, block_k=64, max_concurrent_steps=4, grid_block_n=4)]
tcands = [dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=m, grid_block_n=g) for m in (2, 4) for g in (1, 4)] + \
         [dict(block_m=128, block_n=128, block_k=128, max_concurrent_steps=3, grid_block_n=1)]
for (m, k, n, g) in shapes:
  if time.time() - t0 > 420: break
  ks = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(ks[0], (m, k), jnp.bfloat16)
  w = jax.random.normal(ks[1], (g, k, n), jnp.bfloat16)
  dy = jax.random.normal(ks[2], (m, n), jnp.bfloat16)
  p = np.ones(g); s = np.full(g, m // g, np.int32); s[0] += m - s.sum(); gs = jnp.asarray(s)
  fl = 2 * m * k * n
  tx = bench(lambda a, b: jax.lax.ragged_dot(a, b, gs), x, w, n=5)
  sweep.append(dict(op='xla_fwd', m=m, k=k, n=n, g=g, ms=tx * 1e3, tflops=fl / tx / 1e12)); print(sweep[-1], flush=True)
  xd = jax.random.normal(ks[0], (m // g * 1, k), jnp.bfloat16)
  for op in ('gmm', 'gmm_t', 'tgmm'):
    for c in (tcands if op == 'tgmm' else cands):
      if time.time() - t0 > 480: break
      try:
        if op == 'gmm':
          if n % c['block_n']: continue
          f = lambda a, b, c=c: R.ragged_dot(a, b, group_sizes=gs, **c); args = (x, w)
        elif op == 'gmm_t':
          if k % c['block_n']: continue
          f = lambda a, b, c=c: R.ragged_dot(a, b, group_sizes=gs, transpose_rhs=True, **c); args = (dy, w)
        else:
          if k % c['block_m'] or n % c['block_n']: continue
          f = lambda a, b, c=c: TR.transposed_ragged_dot(a, b, group_sizes=gs, **c); args = (x, dy)
        t = bench(f, *args, n=10)
        row = dict(op=op, m=m, k=k, n=n, g=g, **c, ms=t * 1e3, tflops=fl / t / 1e12)
      except Exception as e:
        row = dict(op=op, m=m, k=k, n=n, g=g, **c, error=repr(e)[:300])
      sweep.append(row); print(row, flush=True)
  json.dump(sweep, open(f'{OUT}/sweep.json', 'w'), indent=1)
# Roof: a plain bf16 matmul
a = jax.random.normal(jax.random.key(2), (32768, 2048), jnp.bfloat16); b = jax.random.normal(jax.random.key(3), (2048, 8192), jnp.bfloat16)
t = bench(lambda a, b: a @ b, a, b)
print('roof matmul 32768x2048x8192', t * 1e3, 'ms', 2 * 32768 * 2048 * 8192 / t / 1e12, 'TF/s')
