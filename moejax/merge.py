"""Merging models: sparse upcycling, Branch-Train-MiX and model soups, as pure transforms of
parameter trees (unboxed nested dicts of arrays, the `params` of a TrainState).

Shapes: E experts, D d_model, F d_ff, N sources (ingredients or branches).

Every transform returns `(params, actions)`: the merged tree, shaped like the target's, and a list
of `Action(kind, path, detail)` with kind 'copied', 'averaged' or 'created', one per target
parameter, so a caller can say what the merge did. Parameters the transforms create (routers,
shared experts) come from `target_params`, a fresh initialisation of the target model; the
transforms never read optimizer state. moejax.train.init_workdir turns the result into a
step-0 workdir that train.py continues.

The first steps after a merge: the merged checkpoint holds parameters only, so training starts
with fresh Adam moments (zero) and the merged config's learning-rate schedule from step 0,
warmup included. The warmup is what keeps those first steps sane: Adam's early updates have
about the learning rate's size whatever the gradient, which without warmup would move the new
router and the copied experts far from the merged function at once. The sources' optimizer
moments are not reused: they belong to the dense FFN, not to E experts and a router.

Dense FFN layers keep `layer_i/ffn/mlp/{wi_0, wi_1: [D, F], wo: [F, D]}`; MoE layers hold
`layer_i/ffn/experts/{wi_0, wi_1: [E, D, F], wo: [E, F, D]}` beside `layer_i/ffn/router/kernel`.
"""
from typing import Any, Callable, NamedTuple, Sequence
import zlib  # a path hash that, unlike hash(), is the same in every process

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import data as data_lib
from moejax import model as model_lib
from moejax import objective as objective_lib
from moejax import precision
from moejax import train
from moejax import workdir as workdir_lib

PyTree = Any
FFN_WEIGHTS = ('wi_0', 'wi_1', 'wo')
# model.* keys that sources and targets must share for any merge: the trunk's shapes.
TRUNK_KEYS = ('vocab_size', 'd_model', 'num_layers', 'num_heads')
# model.* keys that decide every parameter's shape: soup ingredients and BTX branches share them.
SHAPE_KEYS = TRUNK_KEYS + ('d_ff', 'ffn', 'moe_every', 'first_dense_layers', 'tie_embeddings',
                           'moe.num_experts', 'moe.d_ff', 'moe.num_shared_experts', 'moe.router',
                           'moe.activation')


class Action(NamedTuple):
  """What a merge did to one target parameter: kind 'copied' | 'averaged' | 'created'."""
  kind: str
  path: str
  detail: str


def _get(model_config, dotted):
  value = model_config
  for key in dotted.split('.'):
    value = value[key]
  return value


def check_fit(configs: Sequence[ml_collections.ConfigDict], names: Sequence[str],
              keys: Sequence[str] = TRUNK_KEYS) -> None:
  """Raises one-line ValueError naming the first model.* key (of `keys`) where the model
  configs differ: `model.d_model: 128 (W1) vs 64 (W2)`."""
  first = configs[0]
  for key in keys:
    for config, name in zip(configs[1:], names[1:]):
      if _get(config, key) != _get(first, key):
        raise ValueError(f'model.{key}: {_get(first, key)!r} ({names[0]}) vs '
                         f'{_get(config, key)!r} ({name}); these models cannot be merged')


def _flat(params: PyTree) -> dict[str, jax.Array]:
  return flax.traverse_util.flatten_dict(params, sep='/')


def _unflat(flat: dict[str, jax.Array]) -> PyTree:
  return flax.traverse_util.unflatten_dict(flat, sep='/')


def _expert_source(path: str) -> tuple[int, str] | None:
  """(layer, weight) for a target path `layer_{i}/ffn/experts/{w}`, else None."""
  parts = path.split('/')
  if len(parts) == 4 and parts[0].startswith('layer_') and parts[1:3] == ['ffn', 'experts']:
    return int(parts[0][len('layer_'):]), parts[3]
  return None


def _dense_ffn_path(layer: int, weight: str) -> str:
  return f'layer_{layer}/ffn/mlp/{weight}'


def _check_shape(path, got, want, source):
  if got.shape != want.shape:
    raise ValueError(f'{path}: {source} has shape {got.shape}, the target needs {want.shape}')


def _fill(target_params: PyTree, model_config, sources: Sequence[dict[str, jax.Array]],
          experts_fn: Callable[[str, int, str, jax.Array], tuple[jax.Array, str]],
          ) -> tuple[PyTree, list[Action]]:
  """Walks the target tree: MoE expert weights from `experts_fn`, routers and shared experts
  created, every other parameter the mean of the sources (a copy when there is one source)."""
  flat_target = _flat(target_params)
  out, actions, used = {}, [], set()
  for path, target in flat_target.items():
    expert = _expert_source(path)
    if expert is not None and model_lib.is_moe_layer(model_config, expert[0]):
      out[path], detail = experts_fn(path, *expert, target)
      used.add(_dense_ffn_path(*expert))
      actions.append(Action('copied', path, detail))
      continue
    missing = [i for i, source in enumerate(sources) if path not in source]
    if missing:
      if '/ffn/router/' in path or '/ffn/shared_experts/' in path:
        out[path] = target
        actions.append(Action('created', path, 'fresh initialisation of the target'))
        continue
      raise ValueError(f'{path}: source {missing[0]} has no such parameter (the target model has '
                       'another layout; compare the model configs)')
    for i, source in enumerate(sources):
      _check_shape(path, source[path], target, f'source {i}')
    used.add(path)
    if len(sources) == 1:
      out[path] = jnp.asarray(sources[0][path], target.dtype)
      actions.append(Action('copied', path, 'from the source'))
    else:
      mean = jnp.mean(jnp.stack([jnp.asarray(s[path], jnp.float32) for s in sources]), axis=0)
      out[path] = mean.astype(target.dtype)
      actions.append(Action('averaged', path, f'mean of {len(sources)} sources'))
  unused = sorted(set().union(*sources) - used)
  if unused:
    raise ValueError(f'{unused[0]}: a source parameter with no place in the target model '
                     f'({len(unused)} such); compare model.ffn, moe_every and first_dense_layers')
  return _unflat(out), actions


def upcycle(dense_params: PyTree, target_params: PyTree,
            target_model_config: ml_collections.ConfigDict, noise_scale: float = 0.0,
            rng: jax.Array | None = None) -> tuple[PyTree, list[Action]]:
  """Sparse upcycling (Komatsuzaki et al. 2022): every expert of each MoE layer starts as a copy
  of that layer's dense FFN; routers are new; everything else is copied.

  The target's expert width `moe.d_ff` must equal the dense `d_ff`. With normalised top-k gates
  (which sum to 1 over identical experts) and no shared experts, the upcycled model computes the
  dense model's function exactly. `noise_scale` > 0 adds Gaussian noise of std
  noise_scale · std(w) to each copy (independent per expert) to break the experts' symmetry;
  it then no longer preserves the function exactly. `rng` keys that noise.
  """
  if noise_scale < 0:
    raise ValueError(f'noise_scale={noise_scale}; expected >= 0')
  if noise_scale > 0 and rng is None:
    raise ValueError('upcycle: noise_scale > 0 needs an rng')
  dense = _flat(dense_params)
  num_experts = target_model_config.moe.num_experts

  def experts_fn(path, layer, weight, target):
    source_path = _dense_ffn_path(layer, weight)
    if source_path not in dense:
      raise ValueError(f'{path}: the source has no dense FFN {source_path} to upcycle')
    w = dense[source_path]
    _check_shape(path, w, target[0], source_path)
    copies = jnp.broadcast_to(jnp.asarray(w, jnp.float32), target.shape)  # [E, ...]
    detail = f'{source_path} into each of {num_experts} experts'
    if noise_scale > 0:
      key = jax.random.fold_in(rng, zlib.crc32(path.encode()))
      copies = copies + noise_scale * jnp.std(w) * jax.random.normal(key, target.shape)
      detail += f' plus noise ({noise_scale} x std)'
    return copies.astype(target.dtype), detail

  return _fill(target_params, target_model_config, [dense], experts_fn)


def btx(branch_params: Sequence[PyTree], target_params: PyTree,
        target_model_config: ml_collections.ConfigDict) -> tuple[PyTree, list[Action]]:
  """Branch-Train-MiX (Sukhbaatar et al. 2024): N dense branches with a shared start become one
  MoE whose expert e in every MoE layer is branch e's FFN; every other parameter is the
  branches' mean and the routers are new. Needs `moe.num_experts` == N and `moe.d_ff` == the
  branches' `d_ff`."""
  branches = [_flat(p) for p in branch_params]
  num_experts = target_model_config.moe.num_experts
  if num_experts != len(branches):
    raise ValueError(f'model.moe.num_experts={num_experts}; BTX needs one expert per branch '
                     f'({len(branches)})')

  def experts_fn(path, layer, weight, target):
    source_path = _dense_ffn_path(layer, weight)
    stacked = []
    for e, branch in enumerate(branches):
      if source_path not in branch:
        raise ValueError(f'{path}: branch {e} has no dense FFN {source_path}')
      _check_shape(path, branch[source_path], target[e], f'branch {e} {source_path}')
      stacked.append(jnp.asarray(branch[source_path], target.dtype))
    return jnp.stack(stacked), f'expert e = branch e\'s {source_path} (e < {num_experts})'

  return _fill(target_params, target_model_config, branches, experts_fn)


def uniform_soup(ingredients: Sequence[PyTree]) -> PyTree:
  """The uniform soup (Wortsman et al. 2022): the element-wise mean of models that share an
  initialisation and a layout. Means are taken in float32 and cast back to each leaf's dtype."""
  if not ingredients:
    raise ValueError('uniform_soup: no ingredients')
  structures = {jax.tree.structure(p) for p in ingredients}
  if len(structures) > 1:
    raise ValueError('uniform_soup: the ingredients have different parameter trees')
  for path_leaves in zip(*[jax.tree_util.tree_leaves_with_path(p) for p in ingredients]):
    shapes = {np.shape(leaf) for _, leaf in path_leaves}
    if len(shapes) > 1:
      raise ValueError(f'uniform_soup: {jax.tree_util.keystr(path_leaves[0][0])} has shapes '
                       f'{sorted(shapes)} across ingredients')
  return jax.tree.map(
      lambda *leaves: jnp.mean(jnp.stack([jnp.asarray(x, jnp.float32) for x in leaves]),
                               axis=0).astype(jnp.asarray(leaves[0]).dtype),
      *ingredients)


class GreedySoup(NamedTuple):
  """The greedy soup and how it was chosen: ingredient indices in the order tried (best held-out
  loss first), their own losses, which were kept, and the soup's loss."""
  params: PyTree
  order: list[int]
  ingredient_losses: list[float]
  kept: list[int]
  loss: float


def greedy_soup(ingredients: Sequence[PyTree], loss_fn: Callable[[PyTree], float]) -> GreedySoup:
  """The greedy soup (Wortsman et al. 2022, Recipe 1): ingredients sorted by held-out loss, each
  added to the soup (the uniform mean of those kept) only if that lowers the held-out loss.

  `loss_fn(params) -> float` scores on the selection split, which must be held-out *training*
  data, never the validation split the soup is reported on. Starts from the best ingredient, so
  the soup never scores worse than it on that split.
  """
  if not ingredients:
    raise ValueError('greedy_soup: no ingredients')
  losses = [float(loss_fn(p)) for p in ingredients]
  order = sorted(range(len(ingredients)), key=lambda i: losses[i])
  kept, best = [order[0]], losses[order[0]]
  soup = ingredients[order[0]]
  for i in order[1:]:
    candidate = uniform_soup([ingredients[j] for j in kept + [i]])
    loss = float(loss_fn(candidate))
    if loss < best:
      kept, best, soup = kept + [i], loss, candidate
  return GreedySoup(soup, order, losses, kept, best)


def summarize(actions: Sequence[Action]) -> str:
  """A few lines for the merge script: counts per kind, then each action."""
  counts = {kind: sum(a.kind == kind for a in actions) for kind in ('copied', 'averaged',
                                                                      'created')}
  lines = [', '.join(f'{n} {kind}' for kind, n in counts.items())]
  lines += [f'  {a.kind:8s} {a.path}: {a.detail}' for a in actions]
  return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------
# Workdirs: what experiments/merge.py runs. Reads the sources' parameters (never their optimizer
# state) and writes a step-0 workdir.

METHODS = ('upcycle', 'btx', 'soup', 'greedy_soup')


def _union_of_domains(includes: Sequence[str]) -> str:
  """data.include of a model trained on all the branches' domains ('' when any saw everything)."""
  if any(not include.strip() for include in includes):
    return ''
  patterns = []
  for include in includes:
    patterns += [p.strip() for p in include.split(',') if p.strip() and p.strip() not in patterns]
  return ','.join(patterns)


def target_config(method: str, source_configs: Sequence[ml_collections.ConfigDict],
                  config: ml_collections.ConfigDict | None = None
                  ) -> tuple[ml_collections.ConfigDict, list[str]]:
  """The merged workdir's config and a line per field the method set.

  `config` (the --config of the merge script) defaults to the first source's config; then
  upcycle and btx make every layer that the config's moe_every/first_dense_layers select an MoE
  layer (`model.ffn='moe'`) with expert width `moe.d_ff` = the sources' `d_ff`, and btx one
  expert per branch; btx also trains on the union of the branches' domains (`data.include`)
  unless `config` sets a `data.include` other than the first branch's. `train.init_from` is
  cleared: the merged checkpoint is the start.
  """
  if method not in METHODS:
    raise ValueError(f'--method={method!r}; expected one of {METHODS}')
  config = ml_collections.ConfigDict((config or source_configs[0]).to_dict())
  source = source_configs[0]
  wanted = {('train', 'init_from'): ''}
  if method in ('upcycle', 'btx'):
    wanted[('model', 'ffn')] = 'moe'
    wanted[('model', 'moe', 'd_ff')] = source.model.d_ff
  if method == 'btx':
    wanted[('model', 'moe', 'num_experts')] = len(source_configs)
    if config.data.include == source.data.include:
      wanted[('data', 'include')] = _union_of_domains([c.data.include for c in source_configs])
  changes = []
  for keys, value in wanted.items():
    section = config
    for key in keys[:-1]:
      section = section[key]
    if section[keys[-1]] != value:
      changes.append(f'{".".join(keys)}: {section[keys[-1]]!r} -> {value!r}')
      section[keys[-1]] = value
  if method == 'btx' and config.model.moe.top_k > len(source_configs):
    raise ValueError(f'model.moe.top_k={config.model.moe.top_k} exceeds the {len(source_configs)} '
                     'experts (one per branch); pass a config with a smaller top_k')
  return config, changes


def _selection_loss_fn(config: ml_collections.ConfigDict, router_state: PyTree
                       ) -> Callable[[PyTree], float]:
  """params -> mean cross-entropy on `train.eval_steps` batches of the selection split."""
  ds = data_lib.make_dataset(config.data, config.seed, config.model.vocab_size)
  batches = [jnp.asarray(b) for b in ds.selection_batches(config.train.eval_steps)]
  model = model_lib.build_model(config.model, precision.get_policy(config.precision.policy))
  variables = lambda p: {'params': p, 'router_state': router_state} if router_state else {
      'params': p}

  @jax.jit
  def batch_loss(params, batch):
    logits, _ = model.apply(variables(params), batch[..., :-1], train=False)
    return objective_lib.cross_entropy(logits, batch[..., 1:])

  return lambda params: float(np.mean([float(batch_loss(params, b)) for b in batches]))


def merge_workdirs(method: str, sources: Sequence[str], workdir: str,
                   config: ml_collections.ConfigDict | None = None, noise_scale: float = 0.0
                   ) -> list[str]:
  """Merges the source workdirs' latest parameters by `method` into a new step-0 `workdir`.

  Returns the lines to print: the config fields the method set, then what happened to each
  parameter (and, for greedy_soup, the selection losses). Raises one-line ValueErrors naming
  what differs when the sources do not fit each other or the target config.
  """
  if not sources:
    raise ValueError('--sources is empty; give one or more workdirs')
  if method == 'upcycle' and len(sources) != 1:
    raise ValueError(f'--method=upcycle takes one dense source; got {len(sources)}')
  restored = [workdir_lib.restore_params(w) for w in sources]
  source_configs = [r[0] for r in restored]
  names = list(sources)
  for source_config, name in zip(source_configs, names):
    if source_config.ensemble.size > 1:
      raise ValueError(f'ensemble.size={source_config.ensemble.size} in {name}; the merges take '
                       'single-model workdirs')
  check_fit([c.model for c in source_configs], names,
            TRUNK_KEYS if method == 'upcycle' else SHAPE_KEYS)
  if method == 'btx':
    not_dense = [c for c in source_configs if c.model.ffn != 'dense']
    if not_dense:
      raise ValueError(f"model.ffn: {not_dense[0].model.ffn!r} in a branch; BTX merges dense "
                       "branches (model.ffn='dense')")
  config, lines = target_config(method, source_configs, config)
  check_fit([config.model] + [c.model for c in source_configs], ['target'] + names,
            TRUNK_KEYS if method in ('upcycle', 'btx') else SHAPE_KEYS)
  lines = [f'set {change}' for change in lines]
  params_list = [r[1] for r in restored]

  if method in ('upcycle', 'btx'):
    model = model_lib.build_model(config.model, precision.get_policy(config.precision.policy))
    tokens = jnp.zeros((1, config.data.seq_len), jnp.int32)
    fresh = nn.unbox(jax.jit(lambda r: model.init({'params': r}, tokens))(
        jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)))
    if method == 'upcycle':
      params, actions = upcycle(params_list[0], fresh['params'], config.model, noise_scale,
                                jax.random.PRNGKey(config.seed))
    else:
      params, actions = btx(params_list, fresh['params'], config.model)
    router_state = dict(fresh.get('router_state', {}))
  else:
    router_states = [r[2] for r in restored]
    router_state = uniform_soup(router_states) if router_states[0] else router_states[0]
    if method == 'soup':
      params = uniform_soup(params_list)
      detail = f'mean of {len(sources)} ingredients'
    else:
      data_lib.check_selection_split(
          [config.data.selection_fraction] + [c.data.selection_fraction for c in source_configs],
          'the greedy soup', 'every ingredient')
      soup = greedy_soup(params_list, _selection_loss_fn(config, router_state))
      params = soup.params
      lines += [f'selection loss {soup.ingredient_losses[i]:.4f} {sources[i]}'
                + (' (kept)' if i in soup.kept else '') for i in soup.order]
      lines.append(f'greedy soup of {len(soup.kept)}: selection loss {soup.loss:.4f}')
      detail = 'mean of ' + ', '.join(sources[i] for i in soup.kept)
    kind = 'copied' if method == 'greedy_soup' and len(soup.kept) == 1 else 'averaged'
    actions = [Action(kind, '/'.join(str(getattr(k, 'key', k)) for k in path), detail)
               for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  train.init_workdir(config, workdir, params, router_state)
  return lines + [summarize(actions), f'wrote {workdir} (step 0; train.py --workdir={workdir} '
                                      'continues it)']
