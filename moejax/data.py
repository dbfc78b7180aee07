"""Byte-level tokenizer and the corpora the language model trains on.

Shapes: B rows of a batch (data.batch_size or data.eval_batch_size, global), S data.seq_len; each row holds
S+1 tokens so that inputs are row[:-1] and targets row[1:].

Three corpora, chosen by `data.corpus`:
  'stdlib'  the Python standard library's own `*.py` sources on the running machine: real text, present
            everywhere, no download. `site-packages` and the test suites (directories `test`, `tests`,
            `idle_test`) are skipped, which leaves the library code itself (about 12 MB on CPython 3.11) and
            keeps loading under a second. The corpus differs slightly between Python versions.
  'text'    text files matching `data.paths` (comma-separated globs, `**` allowed), read as bytes.
  'tokens'  pre-tokenized files of `data.token_dtype` ('uint16' | 'uint32') matching `data.paths`, read with
            np.memmap. The last `val_fraction` of the tokens of each file is the validation split.
'stdlib' and 'text' are split into train and validation by file: a file is held out when a hash of its path
(relative to the stdlib root, or to the literal directory before the glob's first wildcard) falls below
`val_fraction`, so the split does not depend on how many files there are or the order they are listed in.
Documents are byte-tokenized and each one is followed by the end-of-document token.

Domains: `data.include` (comma-separated globs such as 'asyncio/**,email/**', matched with fnmatch against the
relative POSIX paths above, '' = every file) keeps only the matching files of 'stdlib' and 'text', in both
splits, so a branch can specialise on a domain and be scored on that domain's validation files. The standard
library's top-level packages are natural domains (Branch-Train-Merge, Li et al. 2022, found that branches need
domain splits; random splits do not help).

Selection split: `data.selection_fraction` > 0 holds out training data that training never sees, for fits and
choices made after training: the greedy soup (moejax.merge) and the stacked and gated fusions (moejax.ensemble).
For 'stdlib' and 'text' it is that share of the training files (by a second hash of the path); for 'tokens', the
last `selection_fraction` of each file's training tokens (those before its validation tail), cut back to the
end-of-document token (EOD_ID) before it so that no document is split; a file without one is cut at the exact
token. The validation split stays untouched for reporting.

Batches are pure functions of (seed, step): no iterator state, so resuming a run needs nothing from here.
"""
import dataclasses
import fnmatch
import functools
import glob
import hashlib
import os
import sysconfig

import numpy as np

EOD_ID = 256
VOCAB_SIZE = 257

CORPORA = ('stdlib', 'text', 'tokens')
TOKEN_DTYPES = ('uint16', 'uint32')
_STDLIB_SKIP_DIRS = frozenset({'site-packages', 'dist-packages', '__pycache__', 'test', 'tests', 'idle_test'})


def encode(text):
  """UTF-8 bytes of `text` (str or bytes) as int32 token ids in [0, 256); no EOD is appended."""
  if isinstance(text, str):
    text = text.encode('utf-8')
  return np.frombuffer(bytes(text), dtype=np.uint8).astype(np.int32)


def decode(ids):
  """Token ids -> str. Ids outside [0, 256) (EOD, padding) are dropped; invalid UTF-8 becomes U+FFFD."""
  ids = np.asarray(ids).reshape(-1)
  byte_ids = ids[(ids >= 0) & (ids < 256)].astype(np.uint8)
  return byte_ids.tobytes().decode('utf-8', errors='replace')


def stdlib_root():
  """Directory of the running interpreter's standard library."""
  return sysconfig.get_paths()['stdlib']


def stdlib_files(root=None):
  """Sorted paths of the standard library's `*.py` files under `root`, without site-packages and tests."""
  root = root or stdlib_root()
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
    paths.extend(os.path.join(dirpath, f) for f in filenames if f.endswith('.py'))
  return sorted(paths)


def _path_draw(relative_path, salt=''):
  key = (salt + relative_path.replace(os.sep, '/')).encode('utf-8')
  return int.from_bytes(hashlib.sha256(key).digest()[:8], 'little') / 2.0**64


def is_validation_file(relative_path, val_fraction):
  """Whether a file belongs to the validation split: a hash of its relative POSIX path below val_fraction."""
  return _path_draw(relative_path) < val_fraction


def is_selection_file(relative_path, selection_fraction):
  """Whether a training file is held out as the selection split: a second, independent hash of its path."""
  return _path_draw(relative_path, salt='selection:') < selection_fraction


def _include_patterns(include_field):
  return tuple(p.strip() for p in include_field.split(',') if p.strip())


def _filter_included(named_paths, include_field, source):
  """[(path, relative path)] restricted to the relative paths matching a `data.include` glob ('' = all)."""
  patterns = _include_patterns(include_field)
  if not patterns:
    return named_paths
  kept = [(p, rel) for p, rel in named_paths
          if any(fnmatch.fnmatchcase(rel.replace(os.sep, '/'), pattern) for pattern in patterns)]
  if not kept:
    raise ValueError(f'data.include={include_field!r} matches none of the {len(named_paths)} files of {source} '
                     "(patterns match paths relative to the corpus root, e.g. 'asyncio/**')")
  return kept


def _glob_root(pattern):
  """The literal directory before the first wildcard component of a glob pattern."""
  parts = pattern.split(os.sep)
  literal = []
  for part in parts[:-1]:
    if any(c in part for c in '*?['):
      break
    literal.append(part)
  root = os.sep.join(literal)
  if not root:  # '/*.txt' is rooted at '/', 'a*/b.txt' at the working directory
    return os.sep if pattern.startswith(os.sep) else '.'
  return root


def _expand_globs(paths_field):
  """`data.paths` -> sorted unique [(file path, path relative to its glob's root)]."""
  patterns = [p.strip() for p in paths_field.split(',') if p.strip()]
  if not patterns:
    raise ValueError("data.paths is empty; give one or more comma-separated globs for corpus 'text' or 'tokens'")
  files = {}
  for pattern in patterns:
    pattern = os.path.expanduser(pattern)
    matches = [m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m)]
    if not matches:
      raise ValueError(f'data.paths: {pattern!r} matches no file')
    root = _glob_root(pattern)
    for match in matches:
      files.setdefault(os.path.abspath(match), os.path.relpath(match, root))
  return sorted(files.items())


def _join_documents(paths):
  """Byte-tokenize files and join them, each followed by EOD, into one uint16 stream."""
  if not paths:
    return np.zeros(0, np.uint16)
  docs = [np.fromfile(p, dtype=np.uint8) for p in paths]
  ends = np.cumsum([len(d) for d in docs])
  return np.insert(np.concatenate(docs).astype(np.uint16), ends, EOD_ID)


def _split_by_file(named_paths, val_fraction, source, include='', selection_fraction=0.0):
  """[(path, relative path)] -> (train, val, selection streams), split by hashing the relative paths."""
  named_paths = _filter_included(named_paths, include, source)
  if sum(os.path.getsize(p) for p, _ in named_paths) == 0:
    raise ValueError(f'{source}: the corpus is empty (all {len(named_paths)} files have 0 bytes)')
  val = [p for p, rel in named_paths if is_validation_file(rel, val_fraction)]
  rest = [(p, rel) for p, rel in named_paths if not is_validation_file(rel, val_fraction)]
  selection = [p for p, rel in rest if is_selection_file(rel, selection_fraction)]
  train = [p for p, rel in rest if not is_selection_file(rel, selection_fraction)]
  if not val:
    raise ValueError(f'data.val_fraction={val_fraction} puts none of the {len(named_paths)} files of {source} in '
                     'the validation split; raise data.val_fraction or add files')
  if not train:
    raise ValueError(f'data.val_fraction={val_fraction} puts all {len(named_paths)} files of {source} in the '
                     'validation split; lower data.val_fraction or add files')
  return _join_documents(train), _join_documents(val), _join_documents(selection)


@functools.lru_cache(maxsize=8)
def _load_stdlib(root, val_fraction, include, selection_fraction):
  paths = stdlib_files(root)
  if not paths:
    raise ValueError(f"data.corpus='stdlib': no *.py files under the standard library at {root!r}")
  named = [(p, os.path.relpath(p, root)) for p in paths]
  return _split_by_file(named, val_fraction, f'the standard library at {root!r}', include, selection_fraction)


@functools.lru_cache(maxsize=8)
def _load_text(paths_field, val_fraction, include, selection_fraction):
  return _split_by_file(_expand_globs(paths_field), val_fraction, f'data.paths={paths_field!r}', include,
                        selection_fraction)


def _document_start(tokens, cut, chunk=1 << 20):
  """The position just after the last EOD in tokens[:cut], or `cut` when there is none. Scans back a chunk at a
  time, so a large memmap is not compared whole."""
  hi = cut
  while hi > 0:
    lo = max(0, hi - chunk)
    ends = np.flatnonzero(np.asarray(tokens[lo:hi]) == EOD_ID)
    if len(ends):
      return lo + int(ends[-1]) + 1
    hi = lo
  return cut


@functools.lru_cache(maxsize=4)
def _load_tokens(paths_field, token_dtype, val_fraction, vocab_size, selection_fraction):
  """Memmap token files -> (train, val, selection streams): each file's last val_fraction of tokens is validation,
  the last selection_fraction of the rest (cut back to an EOD) selection. One file: views, no copy."""
  dtype = np.dtype(token_dtype)
  train, val, selection = [], [], []
  for path, _ in _expand_globs(paths_field):
    size = os.path.getsize(path)
    if size % dtype.itemsize:
      raise ValueError(f'{path}: {size} bytes is not a whole number of data.token_dtype={token_dtype!r} tokens')
    if size == 0:
      continue
    tokens = np.memmap(path, dtype=dtype, mode='r')
    max_id = int(tokens.max())
    if max_id >= vocab_size:
      raise ValueError(f'{path}: token id {max_id} >= model.vocab_size={vocab_size}')
    num_train = len(tokens) - int(np.ceil(len(tokens) * val_fraction))
    cut = num_train - int(np.ceil(num_train * selection_fraction))
    if cut < num_train:
      cut = _document_start(tokens, cut)
    train.append(tokens[:cut])
    selection.append(tokens[cut:num_train])
    val.append(tokens[num_train:])
  if not train:
    raise ValueError(f'data.paths={paths_field!r}: the token corpus is empty (0 tokens)')
  join = lambda parts: parts[0] if len(parts) == 1 else np.concatenate(parts)
  return join(train), join(val), join(selection)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train and validation token streams plus the batching rules of the train loop.

  Attributes:
    train_tokens: 1-D array of token ids (uint16 or uint32; batches come out int32).
    val_tokens: 1-D array of token ids.
    seq_len: S; rows hold S+1 tokens.
    batch_size: global train batch B.
    eval_batch_size: global eval batch.
    seed: seeds the train offsets together with the step.
    selection_tokens: 1-D array, the selection split (empty unless data.selection_fraction > 0).
    bytes_per_token: bytes of text per token, for bits per byte. 1.0 for the byte-level corpora; for 'tokens'
      corpora the tokenizer is unknown here, so it is 1.0 too and "bits per byte" is then bits per token.
  """
  train_tokens: np.ndarray = dataclasses.field(repr=False)
  val_tokens: np.ndarray = dataclasses.field(repr=False)
  seq_len: int
  batch_size: int
  eval_batch_size: int
  seed: int
  bytes_per_token: float = 1.0
  selection_tokens: np.ndarray = dataclasses.field(repr=False, default_factory=lambda: np.zeros(0, np.uint16))

  def train_batch(self, step, process_index=0, process_count=1):
    """This process's rows of the global train batch of `step`: int32 [B / process_count, S+1].

    The global batch takes B windows at offsets drawn by `np.random.default_rng([seed, step])`, so it is a pure
    function of (seed, step); process p gets the contiguous rows [p·B/P, (p+1)·B/P).
    """
    if step < 0:
      raise ValueError(f'train_batch: step must be >= 0, got {step}')
    lo, hi = _process_rows(self.batch_size, process_index, process_count, 'data.batch_size')
    rng = np.random.default_rng([self.seed, step])
    starts = rng.integers(0, len(self.train_tokens) - self.seq_len, size=self.batch_size)
    return self._windows(self.train_tokens, starts[lo:hi])

  def eval_batches(self, num_batches, process_index=0, process_count=1):
    """`num_batches` arrays int32 [eval_batch_size / process_count, S+1], the same on every call.

    Window j (counting rows across batches) is val_tokens[j·(S+1) : (j+1)·(S+1)], wrapping around to the start
    when the validation split holds fewer windows.
    """
    return self._fixed_batches(self.val_tokens, num_batches, process_index, process_count)

  def selection_batches(self, num_batches, process_index=0, process_count=1):
    """Like `eval_batches`, from the selection split (held-out training data; see data.selection_fraction)."""
    if len(self.selection_tokens) < self.seq_len + 1:
      # Checked here, where the split is read, not when it is drawn: a small domain (data.include) may hold no
      # selection file, and scoring that domain's validation files needs none.
      raise ValueError(f'the selection split holds {len(self.selection_tokens)} tokens, fewer than one window of '
                       f'data.seq_len+1={self.seq_len + 1}; train with a data.selection_fraction > 0 that holds '
                       'out at least one training file (of those data.include selects)')
    return self._fixed_batches(self.selection_tokens, num_batches, process_index, process_count)

  def _fixed_batches(self, tokens, num_batches, process_index, process_count):
    lo, hi = _process_rows(self.eval_batch_size, process_index, process_count, 'data.eval_batch_size')
    window = self.seq_len + 1
    num_windows = len(tokens) // window
    batches = []
    for b in range(num_batches):
      rows = (b * self.eval_batch_size + np.arange(lo, hi)) % num_windows
      batches.append(self._windows(tokens, rows * window))
    return batches

  def _windows(self, tokens, starts):
    """Rows tokens[start : start + S + 1] for each start, as int32 [len(starts), S+1]."""
    index = np.asarray(starts, np.int64)[:, None] + np.arange(self.seq_len + 1)
    return np.asarray(tokens[index], dtype=np.int32)


def check_process_split(batch_size, process_count, field):
  """Every process loads the same number of rows of a global batch."""
  if batch_size % process_count:
    raise ValueError(f'{field}={batch_size} is not divisible by process_count={process_count}')


def _process_rows(batch_size, process_index, process_count, field):
  """[lo, hi) rows of a global batch that belong to one process."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, process_count={process_count})')
  check_process_split(batch_size, process_count, field)
  local = batch_size // process_count
  return process_index * local, (process_index + 1) * local


def make_dataset(data_config, seed, vocab_size):
  """The Dataset that `data_config` (the config's `data` section) describes.

  Args:
    data_config: ConfigDict with corpus, paths, token_dtype, val_fraction, include, selection_fraction, seq_len,
      batch_size, eval_batch_size.
    seed: int, seeds the train batch offsets.
    vocab_size: the model's vocabulary size; every token id must be below it.

  Returns:
    A Dataset. Token streams are cached per process, so building it twice is cheap.
  """
  corpus = data_config.corpus
  val_fraction = float(data_config.val_fraction)
  if corpus not in CORPORA:
    raise ValueError(f'data.corpus must be one of {CORPORA}, got {corpus!r}')
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f'data.val_fraction must be in (0, 1), got {val_fraction}')
  for field in ('seq_len', 'batch_size', 'eval_batch_size'):
    if data_config[field] < 1:
      raise ValueError(f'data.{field} must be >= 1, got {data_config[field]}')
  include, selection_fraction = data_config.include, float(data_config.selection_fraction)
  if not 0.0 <= selection_fraction < 1.0:
    raise ValueError(f'data.selection_fraction must be in [0, 1), got {selection_fraction}')
  if corpus == 'tokens':
    if _include_patterns(include):
      raise ValueError(f"data.include={include!r} picks files of the 'stdlib' and 'text' corpora by path; "
                       "data.corpus='tokens' reads every file of data.paths (leave data.include empty)")
    if data_config.token_dtype not in TOKEN_DTYPES:
      raise ValueError(f'data.token_dtype must be one of {TOKEN_DTYPES}, got {data_config.token_dtype!r}')
    train, val, selection = _load_tokens(data_config.paths, data_config.token_dtype, val_fraction, vocab_size,
                                         selection_fraction)
  else:
    if vocab_size < VOCAB_SIZE:
      raise ValueError(f'model.vocab_size={vocab_size} is smaller than the byte tokenizer\'s {VOCAB_SIZE} '
                       f'(256 bytes + EOD) needed by data.corpus={corpus!r}')
    if corpus == 'stdlib':
      train, val, selection = _load_stdlib(stdlib_root(), val_fraction, include, selection_fraction)
    else:
      train, val, selection = _load_text(data_config.paths, val_fraction, include, selection_fraction)
  for name, tokens in (('train', train), ('validation', val)):
    if len(tokens) < data_config.seq_len + 1:
      raise ValueError(f'data.seq_len={data_config.seq_len}: a window of seq_len+1 tokens is longer than the '
                       f'{name} split of data.corpus={corpus!r} ({len(tokens)} tokens)')
    tokens.flags.writeable = False
  selection.flags.writeable = False
  return Dataset(train_tokens=train, val_tokens=val, seq_len=int(data_config.seq_len),
                 batch_size=int(data_config.batch_size), eval_batch_size=int(data_config.eval_batch_size),
                 seed=int(seed), bytes_per_token=1.0, selection_tokens=selection)


def check_selection_split(fractions, reader, trained):
  """Raises ValueError unless every run that a post-hoc fit or choice draws on was trained with one
  data.selection_fraction > 0: only then does the selection split it reads hold no data any of them trained on.

  Args:
    fractions: the data.selection_fraction of each run (the one whose selection split is read among them).
    reader: what reads the selection split, for the message, e.g. 'the greedy soup'.
    trained: whose training must have left it out, e.g. 'every ingredient'.
  """
  distinct = sorted({float(f) for f in fractions})
  if len(distinct) != 1 or distinct[0] <= 0:
    found = ' and '.join(str(f) for f in distinct)
    raise ValueError(f'data.selection_fraction={found}: {reader} reads the selection split (the training data '
                     f'data.selection_fraction holds out), so {trained} must have been trained with one '
                     'data.selection_fraction > 0')
