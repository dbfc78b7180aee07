"""Tests for moejax/data.py: tokenizer, corpora and their splits, batches."""
import hashlib
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from moejax import data

S = 8  # seq_len in these tests


def data_config(**overrides):
  config = ml_collections.ConfigDict(dict(
      corpus='stdlib', paths='', token_dtype='uint16', val_fraction=0.05, include='',
      selection_fraction=0.0, seq_len=S, batch_size=8, eval_batch_size=4))
  config.update(overrides)
  return config


def write_text_corpus(directory, num_files=24):
  """Files doc00.txt ... with distinct contents; returns {relative path: bytes}."""
  contents = {}
  os.makedirs(directory, exist_ok=True)
  for i in range(num_files):
    text = f'document {i:02d}: ' + 'héllo wörld ' * (i + 3)
    rel = f'doc{i:02d}.txt'
    with open(os.path.join(directory, rel), 'w', encoding='utf-8') as f:
      f.write(text)
    contents[rel] = text.encode('utf-8')
  return contents


def write_tokens(path, tokens, dtype):
  np.asarray(tokens, dtype=dtype).tofile(path)


# Tokenizer


@pytest.mark.parametrize('text', ['', 'hello', 'naïve café ☕ 日本語', 'tab\tnew\nline\x00'])
def test_encode_decode_round_trip(text):
  ids = data.encode(text)
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, list(text.encode('utf-8')))
  assert data.decode(ids) == text
  assert data.decode(data.encode(text.encode('utf-8'))) == text


def test_decode_drops_eod_and_replaces_invalid_utf8():
  ids = np.concatenate([data.encode('ab'), [data.EOD_ID], data.encode('c'), [0xFF]])
  assert data.decode(ids) == 'abc\ufffd'
  assert data.VOCAB_SIZE == data.EOD_ID + 1 == 257


# Stdlib corpus


def test_stdlib_split_is_by_file_deterministic_and_disjoint():
  root = data.stdlib_root()
  files = data.stdlib_files(root)
  assert files == sorted(files) and len(files) > 100
  rels = [os.path.relpath(p, root) for p in files]
  assert not any(part in ('site-packages', 'test', 'tests') for r in rels for part in r.split(os.sep))
  val = {r for r in rels if data.is_validation_file(r, 0.05)}
  train = set(rels) - val
  assert val and train
  # The decision depends on the path only: the same in reverse order, and a subset keeps its assignment.
  assert {r for r in reversed(rels) if data.is_validation_file(r, 0.05)} == val
  assert {r for r in rels[::3] if data.is_validation_file(r, 0.05)} == val & set(rels[::3])
  # A larger val_fraction only moves files from train to validation.
  assert val <= {r for r in rels if data.is_validation_file(r, 0.2)}

  ds = data.make_dataset(data_config(), seed=0, vocab_size=257)
  sizes = {r: os.path.getsize(p) for r, p in zip(rels, files)}
  assert len(ds.val_tokens) == sum(sizes[r] for r in val) + len(val)
  assert len(ds.train_tokens) == sum(sizes[r] for r in train) + len(train)
  assert int((ds.val_tokens == data.EOD_ID).sum()) == len(val)
  assert int((ds.train_tokens == data.EOD_ID).sum()) == len(train)
  assert ds.bytes_per_token == 1.0
  # The first validation document is the sorted-first validation file, byte for byte.
  first_val = sorted(val)[0]
  with open(os.path.join(root, first_val), 'rb') as f:
    expected = f.read()
  np.testing.assert_array_equal(ds.val_tokens[:len(expected)], np.frombuffer(expected, np.uint8))
  assert ds.val_tokens[len(expected)] == data.EOD_ID


def test_train_batch_is_a_pure_function_of_seed_and_step():
  ds = data.make_dataset(data_config(batch_size=8), seed=3, vocab_size=257)
  batch = ds.train_batch(5)
  assert batch.shape == (8, S + 1) and batch.dtype == np.int32
  np.testing.assert_array_equal(batch, ds.train_batch(5))
  np.testing.assert_array_equal(batch, data.make_dataset(data_config(), seed=3, vocab_size=257).train_batch(5))
  assert not np.array_equal(batch, ds.train_batch(6))
  assert not np.array_equal(batch, data.make_dataset(data_config(), seed=4, vocab_size=257).train_batch(5))
  # Process slices are contiguous row blocks of the global batch.
  for count in (2, 4):
    parts = [ds.train_batch(5, process_index=p, process_count=count) for p in range(count)]
    assert all(p.shape == (8 // count, S + 1) for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), batch)


def split_and_batch_fingerprint():
  """sha256 of the stdlib corpus's train and validation streams, a train batch and the eval batches."""
  ds = data.make_dataset(data_config(), seed=3, vocab_size=257)
  parts = [ds.train_tokens, ds.val_tokens, ds.train_batch(7), *ds.eval_batches(2)]
  return [hashlib.sha256(np.ascontiguousarray(p).tobytes()).hexdigest() for p in parts]


def test_split_and_batches_are_the_same_in_every_process():
  """Python salts str/bytes hash() per process: a split drawn with it would differ between the
  processes of one run (and between a run and its resume). Two fresh interpreters with other
  PYTHONHASHSEEDs must reproduce this process's split and batches."""
  script = ('import json, sys; sys.path.insert(0, sys.argv[1]); import test_data; '
            'print(json.dumps(test_data.split_and_batch_fingerprint()))')
  here = split_and_batch_fingerprint()
  for seed in ('1', '2'):
    env = dict(os.environ, PYTHONHASHSEED=seed)
    out = subprocess.run([sys.executable, '-c', script, os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here, f'PYTHONHASHSEED={seed}'


def test_batch_not_divisible_by_processes_names_both_numbers():
  ds = data.make_dataset(data_config(batch_size=8), seed=0, vocab_size=257)
  with pytest.raises(ValueError, match=r'data.batch_size=8 .*process_count=3'):
    ds.train_batch(0, process_index=0, process_count=3)
  with pytest.raises(ValueError, match=r'data.eval_batch_size=4 .*process_count=3'):
    ds.eval_batches(1, process_index=0, process_count=3)


def test_byte_corpus_needs_the_byte_vocabulary():
  with pytest.raises(ValueError, match='model.vocab_size=100'):
    data.make_dataset(data_config(), seed=0, vocab_size=100)


@pytest.mark.parametrize('field,value,match', [
    ('corpus', 'wiki', r"data.corpus must be one of \('stdlib', 'text', 'tokens'\)"),
    ('val_fraction', 0.0, 'data.val_fraction'),
    ('seq_len', 0, 'data.seq_len'),
    ('batch_size', 0, 'data.batch_size'),
])
def test_bad_config_values(field, value, match):
  with pytest.raises(ValueError, match=match):
    data.make_dataset(data_config(**{field: value}), seed=0, vocab_size=257)


# Text corpus


def test_text_glob_corpus(tmp_path):
  contents = write_text_corpus(tmp_path / 'a')
  (tmp_path / 'a' / 'skip.md').write_text('not matched')
  config = data_config(corpus='text', paths=str(tmp_path / 'a' / '*.txt'), val_fraction=0.3)
  ds = data.make_dataset(config, seed=0, vocab_size=257)
  val = sorted(r for r in contents if data.is_validation_file(r, 0.3))
  train = sorted(r for r in contents if not data.is_validation_file(r, 0.3))
  assert val and train
  expected_val = b''.join(contents[r] + b'\xff' for r in val)  # \xff stands in for EOD below.
  got_val = np.where(ds.val_tokens == data.EOD_ID, 0xFF, ds.val_tokens).astype(np.uint8).tobytes()
  assert got_val == expected_val
  assert len(ds.train_tokens) == sum(len(contents[r]) + 1 for r in train)

  # The split is keyed by paths relative to the glob's directory: a moved copy splits the same way, and a
  # second comma-separated glob adds its files.
  moved = write_text_corpus(tmp_path / 'b' / 'nested')
  assert moved == contents
  ds_moved = data.make_dataset(data_config(corpus='text', paths=str(tmp_path / 'b' / 'nested' / '*.txt'),
                                           val_fraction=0.3), seed=0, vocab_size=257)
  np.testing.assert_array_equal(ds_moved.val_tokens, ds.val_tokens)
  both = f"{tmp_path / 'a' / '*.txt'}, {tmp_path / 'a' / '*.md'}"
  ds_both = data.make_dataset(data_config(corpus='text', paths=both, val_fraction=0.3), seed=0, vocab_size=257)
  assert len(ds_both.train_tokens) + len(ds_both.val_tokens) == (
      len(ds.train_tokens) + len(ds.val_tokens) + len('not matched') + 1)


def test_text_corpus_errors(tmp_path):
  missing = str(tmp_path / 'nope' / '*.txt')
  with pytest.raises(ValueError, match=f'{missing!r} matches no file'.replace('*', r'\*')):
    data.make_dataset(data_config(corpus='text', paths=missing), seed=0, vocab_size=257)
  with pytest.raises(ValueError, match='data.paths is empty'):
    data.make_dataset(data_config(corpus='text', paths=' , '), seed=0, vocab_size=257)

  for i in range(3):
    (tmp_path / f'empty{i}.txt').write_bytes(b'')
  with pytest.raises(ValueError, match='corpus is empty'):
    data.make_dataset(data_config(corpus='text', paths=str(tmp_path / 'empty*.txt')), seed=0, vocab_size=257)

  name = next(f'one{i}.txt' for i in range(100) if not data.is_validation_file(f'one{i}.txt', 0.05))
  (tmp_path / name).write_text('a single training file')
  with pytest.raises(ValueError, match=r'data.val_fraction=0.05 puts none of the 1 files'):
    data.make_dataset(data_config(corpus='text', paths=str(tmp_path / name)), seed=0, vocab_size=257)


def test_seq_len_longer_than_split(tmp_path):
  write_text_corpus(tmp_path, num_files=24)
  config = data_config(corpus='text', paths=str(tmp_path / '*.txt'), val_fraction=0.3, seq_len=100_000)
  with pytest.raises(ValueError, match=r'data.seq_len=100000.* train split'):
    data.make_dataset(config, seed=0, vocab_size=257)


# Token corpus


@pytest.mark.parametrize('dtype', ['uint16', 'uint32'])
def test_token_corpus_memmap(tmp_path, dtype):
  vocab = 70_000 if dtype == 'uint32' else 1000
  n = 1000
  write_tokens(tmp_path / 'shard0.bin', np.arange(n) % vocab + (vocab - n if dtype == 'uint32' else 0), dtype)
  config = data_config(corpus='tokens', paths=str(tmp_path / '*.bin'), token_dtype=dtype, val_fraction=0.1)
  ds = data.make_dataset(config, seed=0, vocab_size=vocab)
  offset = vocab - n if dtype == 'uint32' else 0
  assert isinstance(ds.train_tokens, np.memmap) and ds.train_tokens.dtype == np.dtype(dtype)
  np.testing.assert_array_equal(ds.train_tokens, np.arange(900) + offset)
  np.testing.assert_array_equal(ds.val_tokens, np.arange(900, 1000) + offset)
  batch = ds.train_batch(0)
  assert batch.dtype == np.int32 and batch.max() < vocab
  # Rows are contiguous windows of the train stream.
  np.testing.assert_array_equal(np.diff(batch, axis=1), 1)
  assert batch.min() >= offset and batch.max() < offset + 900

  # Eval windows: non-overlapping from the start of the validation stream, wrapping when it runs out.
  evals = ds.eval_batches(4)
  windows = 100 // (S + 1)
  starts = np.concatenate([e[:, 0] for e in evals]) - offset - 900
  np.testing.assert_array_equal(starts, (np.arange(16) % windows) * (S + 1))
  for e, again in zip(evals, ds.eval_batches(4)):
    np.testing.assert_array_equal(e, again)
  halves = [ds.eval_batches(4, process_index=p, process_count=2) for p in range(2)]
  for b in range(4):
    np.testing.assert_array_equal(np.concatenate([halves[0][b], halves[1][b]]), evals[b])


def test_token_corpus_several_files_split_each(tmp_path):
  write_tokens(tmp_path / 'a.bin', np.arange(0, 100), 'uint16')
  write_tokens(tmp_path / 'b.bin', np.arange(100, 300), 'uint16')
  config = data_config(corpus='tokens', paths=str(tmp_path / '*.bin'), val_fraction=0.1)
  ds = data.make_dataset(config, seed=0, vocab_size=300)
  np.testing.assert_array_equal(ds.train_tokens, np.concatenate([np.arange(0, 90), np.arange(100, 280)]))
  np.testing.assert_array_equal(ds.val_tokens, np.concatenate([np.arange(90, 100), np.arange(280, 300)]))


def test_token_corpus_errors(tmp_path):
  write_tokens(tmp_path / 'big.bin', [1, 2, 3, 500] * 50, 'uint16')
  with pytest.raises(ValueError, match=r'big.bin: token id 500 >= model.vocab_size=257'):
    data.make_dataset(data_config(corpus='tokens', paths=str(tmp_path / 'big.bin')), seed=0, vocab_size=257)
  (tmp_path / 'empty.bin').write_bytes(b'')
  with pytest.raises(ValueError, match='token corpus is empty'):
    data.make_dataset(data_config(corpus='tokens', paths=str(tmp_path / 'empty.bin')), seed=0, vocab_size=257)
  (tmp_path / 'odd.bin').write_bytes(b'\x01\x00\x02')
  with pytest.raises(ValueError, match='odd.bin: 3 bytes'):
    data.make_dataset(data_config(corpus='tokens', paths=str(tmp_path / 'odd.bin')), seed=0, vocab_size=257)
  missing = str(tmp_path / 'missing.bin')
  with pytest.raises(ValueError, match='missing.bin'):
    data.make_dataset(data_config(corpus='tokens', paths=missing), seed=0, vocab_size=257)
  with pytest.raises(ValueError, match='data.token_dtype'):
    data.make_dataset(data_config(corpus='tokens', paths=missing, token_dtype='int8'), seed=0, vocab_size=257)


# Domains and the selection split


def test_include_keeps_only_the_domain_in_both_splits():
  root = data.stdlib_root()
  rels = [os.path.relpath(p, root) for p in data.stdlib_files(root)]
  domain = [r for r in rels if r.startswith(('asyncio/', 'email/'))]
  sizes = {r: os.path.getsize(os.path.join(root, r)) for r in domain}
  ds = data.make_dataset(data_config(include='asyncio/**, email/**'), seed=0, vocab_size=257)
  val = [r for r in domain if data.is_validation_file(r, 0.05)]
  # Each file's bytes plus its EOD token.
  assert len(ds.val_tokens) == sum(sizes[r] + 1 for r in val)
  assert len(ds.train_tokens) == sum(sizes[r] + 1 for r in domain if r not in val)
  with pytest.raises(ValueError, match=r"data.include='nope/\*\*' matches none"):
    data.make_dataset(data_config(include='nope/**'), seed=0, vocab_size=257)


def test_selection_split_comes_out_of_the_training_files_only():
  plain = data.make_dataset(data_config(), seed=0, vocab_size=257)
  assert len(plain.selection_tokens) == 0
  with pytest.raises(ValueError, match='selection_fraction'):
    plain.selection_batches(1)
  held = data.make_dataset(data_config(selection_fraction=0.1), seed=0, vocab_size=257)
  np.testing.assert_array_equal(held.val_tokens, plain.val_tokens)
  assert len(held.selection_tokens) > 0
  assert len(held.train_tokens) + len(held.selection_tokens) == len(plain.train_tokens)
  batches = held.selection_batches(2)
  assert len(batches) == 2 and batches[0].shape == (4, S + 1)
  with pytest.raises(ValueError, match='data.selection_fraction'):
    data.make_dataset(data_config(selection_fraction=1.0), seed=0, vocab_size=257)


def test_token_corpus_selection_split_is_each_files_training_tail_cut_at_an_eod(tmp_path):
  # a.bin: documents of 10 tokens (9 ids, then EOD); b.bin has no EOD at all.
  a = np.arange(200) % 10
  a[a == 9] = data.EOD_ID
  write_tokens(tmp_path / 'a.bin', a, 'uint16')
  write_tokens(tmp_path / 'b.bin', np.arange(100), 'uint16')
  config = data_config(corpus='tokens', paths=str(tmp_path / '*.bin'), val_fraction=0.1, selection_fraction=0.25)
  ds = data.make_dataset(config, seed=0, vocab_size=300)
  # a: 180 training tokens, the last 45 selection, moved back to the EOD at 129: the split starts at 130.
  # b: 90 training tokens, the last 23 selection, cut at the exact token (no EOD to move back to).
  np.testing.assert_array_equal(ds.train_tokens, np.concatenate([a[:130], np.arange(67)]))
  np.testing.assert_array_equal(ds.selection_tokens, np.concatenate([a[130:180], np.arange(67, 90)]))
  np.testing.assert_array_equal(ds.val_tokens, np.concatenate([a[180:], np.arange(90, 100)]))
  assert ds.train_tokens[129] == data.EOD_ID and ds.selection_tokens[49] == data.EOD_ID
  assert ds.selection_batches(1)[0].shape == (4, S + 1)
  # Without a selection split, training keeps every token before the validation tail.
  plain = data.make_dataset(data_config(corpus='tokens', paths=str(tmp_path / '*.bin'), val_fraction=0.1),
                            seed=0, vocab_size=300)
  assert len(plain.selection_tokens) == 0
  np.testing.assert_array_equal(plain.train_tokens, np.concatenate([a[:180], np.arange(90)]))
  with pytest.raises(ValueError, match=r"data.include='x/\*\*'.*'tokens'"):
    data.make_dataset(data_config(corpus='tokens', paths=str(tmp_path / '*.bin'), include='x/**'),
                      seed=0, vocab_size=300)


def test_check_selection_split_wants_one_fraction_above_zero():
  data.check_selection_split([0.1, 0.1], 'the greedy soup', 'every ingredient')
  for fractions, found in (([0.0], '0.0'), ([0.1, 0.0], '0.0 and 0.1'), ([0.1, 0.2], '0.1 and 0.2')):
    with pytest.raises(ValueError, match=rf'^data.selection_fraction={found}: the greedy soup .* every ingredient '
                                          r'must have been trained with one data.selection_fraction > 0$'):
      data.check_selection_split(fractions, 'the greedy soup', 'every ingredient')
