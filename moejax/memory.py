"""Memory accounting from the real pytrees: parameter counts and bytes, and a compiled step's memory.

Shapes: E experts, K top_k.

Bytes are counted from the arrays (or `jax.ShapeDtypeStruct`s) themselves, so they follow the
policy's dtypes, the optimizer's moment dtypes and int8 experts with their scales. A token sees
K of the E routed experts of each MoE layer (token choice), so the active parameters count those
K/E of every routed expert stack and all of everything else (attention, norms, embeddings, the
router, shared experts).
"""
from typing import Any

import flax.linen as nn
import jax

PyTree = Any
EXPERTS_MODULE = 'experts'  # the routed experts' submodule in moejax.moe.MoE


def tree_bytes(tree: PyTree) -> int:
  """Bytes of all array leaves (arrays or ShapeDtypeStructs; boxed params are unboxed)."""
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(nn.unbox(tree)))


def tree_size(tree: PyTree) -> int:
  """Number of elements of all array leaves."""
  return sum(int(x.size) for x in jax.tree.leaves(nn.unbox(tree)))


def _in_routed_experts(path) -> bool:
  return any(getattr(key, 'key', None) == EXPERTS_MODULE for key in path)


def expert_weight_bytes(params: PyTree) -> int:
  """Bytes of the routed experts' weights (and int8 scales, when quantised) of every MoE layer."""
  leaves = jax.tree_util.tree_flatten_with_path(nn.unbox(params))[0]
  return sum(int(x.size) * x.dtype.itemsize for path, x in leaves if _in_routed_experts(path))


def num_active_params(params: PyTree, top_k: int, num_experts: int) -> int:
  """Parameters one token uses: top_k / num_experts of each routed expert stack, all the rest."""
  leaves = jax.tree_util.tree_flatten_with_path(nn.unbox(params))[0]
  total = 0
  for path, x in leaves:
    total += int(x.size) * top_k // num_experts if _in_routed_experts(path) else int(x.size)
  return total


def state_accounting(params: PyTree, opt_state: PyTree, model_config) -> dict[str, int]:
  """num_params, num_active_params, params_bytes, opt_state_bytes of a training state."""
  moe = model_config.moe
  top_k, num_experts = (moe.top_k, moe.num_experts) if model_config.ffn == 'moe' else (1, 1)
  return dict(num_params=tree_size(params),
              num_active_params=num_active_params(params, top_k, num_experts),
              params_bytes=tree_bytes(params), opt_state_bytes=tree_bytes(opt_state))


def format_accounting(accounting: dict[str, int]) -> str:
  """One start-up line: total and active parameters, bytes per parameter of params and optimizer,
  and the training FLOPs per token when the accounting has them."""
  n = accounting['num_params']
  flops = accounting.get('flops_per_token')
  return (f'params: {n:,} total, {accounting["num_active_params"]:,} active per token; '
          f'bytes per parameter: params {accounting["params_bytes"] / n:.2f}, optimizer state '
          f'{accounting["opt_state_bytes"] / n:.2f}'
          + ('' if flops is None else f'; training FLOPs per token {flops:,}'))


def compiled_memory(compiled) -> dict[str, int]:
  """Bytes XLA planned for a compiled function (`jax.jit(f).lower(...).compile()`): its arguments,
  outputs, temporaries (one call's activations and workspace), and the outputs aliased onto
  donated arguments."""
  stats = compiled.memory_analysis()
  return dict(argument_bytes=int(stats.argument_size_in_bytes),
              output_bytes=int(stats.output_size_in_bytes),
              temp_bytes=int(stats.temp_size_in_bytes),
              alias_bytes=int(stats.alias_size_in_bytes))
