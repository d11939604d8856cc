"""Training and evaluation from prepared data (`data.source=prepared`, `data.eval_files`).

The loader's batches are a pure function of (seed, step): the same for one host or several,
any number of grain worker processes, and after a resume; a run killed with SIGKILL and started
again ends with exactly the parameters of an uninterrupted run (two hosts: test_multihost.py).
Evaluation on an external text file counts every document; bad prepared data stops with one
line and leaves the workdir as it was.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from pkm_jax import checkpoint as ckpt_lib
from pkm_jax import trainer
from pkm_jax.data import pipeline
from pkm_jax.data import prepare as prepare_lib
from pkm_jax.data import prepared as prepared_lib
from pkm_jax.data.loader import ArrayRows, MLMTrainIterator
from pkm_jax.data.tokenizer import load_tokenizer
from test_prepare import MAX_LEN, reference_rows, write_corpus
from test_trainer import REPO, TINY, assert_trees_equal, final_params, flags_for, tiny_config

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")

# Same devices and matmul precision as this test process (conftest), so runs can match exactly.
ENV = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
       "JAX_DEFAULT_MATMUL_PRECISION": "highest"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """A prepared folder (several shards, 10% of the documents held out) and a test text file."""
  root = tmp_path_factory.mktemp("data")
  pattern = write_corpus(root / "text", num_docs=300)
  test_file = root / "test.txt"  # an "external test set": documents of another world
  write_corpus(root / "test", num_docs=60, seed=7)
  shutil.copy(root / "test" / "part1.txt", test_file)
  prepare_lib.prepare(str(root / "prepared"), inputs=pattern, vocab_size=400, max_len=MAX_LEN,
                      eval_fraction=0.1, rows_per_shard=64, workers=1, progress=False)
  return str(root / "prepared"), str(test_file)


def prepared(path, **more):
  return {**TINY, "data.source": "prepared", "data.path": path, **more}


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ref"))
  return workdir, trainer.train_and_evaluate(tiny_config(**prepared(data[0])), workdir)


def test_batches_do_not_depend_on_hosts_workers_resume_or_storage(data):
  path, _ = data
  tok = load_tokenizer(path)
  cfg = tiny_config(**prepared(path)).data
  steps = 6
  full, _ = pipeline.make_mlm_data(cfg, tok, seed=3)
  want = [next(full) for _ in range(steps)]
  n = len(full.source)
  assert n == prepared_lib.read_metadata(path)["splits"]["train"]["rows"]
  # Two hosts: each reads its own rows; together they are the global batch.
  hosts = [pipeline.make_mlm_data(cfg, tok, seed=3, shard_index=i, shard_count=2)[0]
           for i in range(2)]
  for step in range(steps):
    parts = [next(h) for h in hosts]
    assert parts[0]["input_ids"].shape == (cfg.batch_size // 2, MAX_LEN)
    for k in want[step]:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), want[step][k], k)
  # Two grain worker processes, resumed from a saved state: the same batches.
  cfg.workers = 2
  resumed, _ = pipeline.make_mlm_data(cfg, tok, seed=3)
  resumed.set_state(json.loads(json.dumps(full.get_state())) | {"step": 2})
  for step in range(2, steps):
    got = next(resumed)
    for k in got:
      np.testing.assert_array_equal(got[k], want[step][k], k)
  resumed.close()
  # The same rows held in memory give the same batches: one code path for every source.
  rows = prepared_lib.PreparedRows(path, "train")
  in_memory = MLMTrainIterator(ArrayRows(rows.read(np.arange(n))), full.masker,
                               batch_size=cfg.batch_size, seed=3)
  for k, v in next(in_memory).items():
    np.testing.assert_array_equal(v, want[0][k], k)
  # Each epoch visits every row once, in a new order per epoch.
  originals = lambda b: np.where(b["mlm_weights"] > 0, b["mlm_labels"], b["input_ids"])
  seen = np.concatenate([originals(full.global_batch(s))
                         for s in range(-(-2 * n // cfg.batch_size))])
  keys = lambda a: sorted(r.tobytes() for r in a)
  assert keys(seen[:n]) == keys(in_memory.source.rows_NxT) == keys(seen[n:2 * n])
  assert not np.array_equal(seen[:n], seen[n:2 * n])


def _kill_after_checkpoint(proc: subprocess.Popen, ckpt: str) -> None:
  deadline = time.time() + 300
  while not os.path.isdir(ckpt) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL, "the run ended before it was killed"
  assert os.path.isdir(ckpt), "the run never wrote its first checkpoint"


def test_sigkill_then_rerun_matches_uninterrupted_run(data, reference_run, tmp_path):
  ref_dir, _ = reference_run
  workdir = str(tmp_path / "killed")
  cmd = [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={workdir}",
         *flags_for(prepared(data[0]))]
  proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  _kill_after_checkpoint(proc, os.path.join(workdir, "checkpoints", "6"))
  assert 12 not in ckpt_lib.make_manager(workdir, read_only=True).all_steps()
  done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f"Resuming {workdir} from step 6" in done.stdout
  assert_trees_equal(final_params(workdir), final_params(ref_dir))


def test_eval_on_an_external_file_counts_every_document(data, reference_run, tmp_path):
  path, test_file = data
  ref_dir, _ = reference_run
  tok = load_tokenizer(os.path.join(ref_dir, "tokenizer.json"))
  want_rows = len(reference_rows(test_file, tok))  # every document of the file, packed
  outputs = []
  for flag in (f"--config.data.eval_files={test_file}", None):
    if flag is None:  # the same file prepared into a folder: the same evaluation
      prepare_lib.prepare(str(tmp_path / "test_prepared"), inputs=test_file,
                          tokenizer=os.path.join(ref_dir, "tokenizer.json"), max_len=MAX_LEN,
                          workers=1, progress=False)
      flag = f"--config.data.eval_path={tmp_path / 'test_prepared'}"
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "eval.py"), f"--workdir={ref_dir}", flag,
         *flags_for({k: v for k, v in TINY.items() if k.startswith(("data.", "model."))})],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    outputs.append(json.loads(done.stdout.strip().splitlines()[-1]))
  for result in outputs:
    assert result["eval_sequences"] == want_rows > TINY["data.batch_size"]
    masked = sum(int(b["mlm_weights"].sum()) for b in pipeline.make_eval_data(
        tiny_config(**{"data.eval_files": test_file}).data, tok)())
    assert result["eval_tokens"] == masked
  assert outputs[0] == outputs[1]


def test_bad_prepared_data_one_line_nothing_touched(data, reference_run, tmp_path):
  path, _ = data
  ref_dir, _ = reference_run
  workdir = str(tmp_path / "run")
  shutil.copytree(ref_dir, workdir)
  snapshot = lambda: {os.path.relpath(os.path.join(d, f), workdir): os.path.getmtime(
      os.path.join(d, f)) for d, _, fs in os.walk(workdir) for f in fs}
  before = snapshot()
  more = {"train.steps": 14}  # a resume that would train and save

  def broken(name, change):
    folder = str(tmp_path / name)
    shutil.copytree(path, folder)
    change(folder)
    return folder

  first_shard = lambda folder: os.path.join(folder, "train-00000.array_record")
  missing = broken("missing", lambda f: os.remove(first_shard(f)))
  truncated = broken("truncated", lambda f: os.truncate(first_shard(f), 1000))
  other_tok = str(tmp_path / "other_tok")
  prepare_lib.prepare(other_tok, inputs=os.path.join(os.path.dirname(path), "text", "*.txt"),
                      vocab_size=300, max_len=MAX_LEN, eval_fraction=0.1, workers=1,
                      progress=False)
  cases = [
      (prepared(missing, **more), r"prepared shard .*train-00000.array_record is missing"),
      (prepared(truncated, **more), r"train-00000.array_record has 1000 bytes but metadata"),
      (prepared(str(tmp_path / "none"), **more), r"data.path=.*none does not exist"),
      (prepared(other_tok, **more), r"prepared with another tokenizer \(vocabulary of 300"),
      (prepared(path, **more, **{"data.max_len": 24, "model.max_position_embeddings": 32}),
       r"prepared with max_len=32, but data.max_len=24"),
  ]
  for overrides, message in cases:
    with pytest.raises((ValueError, FileNotFoundError), match=message):
      trainer.train_and_evaluate(tiny_config(**overrides), workdir)
    assert snapshot() == before, overrides
  # A fresh run whose model vocabulary (the tokenizer it is given) is not the data's.
  fresh = str(tmp_path / "fresh")
  with pytest.raises(ValueError, match="prepared with another tokenizer"):
    trainer.train_and_evaluate(tiny_config(**prepared(
        path, **{"data.tokenizer": os.path.join(other_tok, "tokenizer.json")})), fresh)
  assert not os.path.exists(os.path.join(fresh, "tokenizer.json"))
  # A shard corrupted in place (same size) is found when read: one line, exit 1, no checkpoint.
  def flip(folder):  # one byte in each record's data, in every shard
    for name in os.listdir(folder):
      if name.startswith("train-"):
        with open(os.path.join(folder, name), "r+b") as f:
          raw = bytearray(f.read())
          for at in range(300, min(len(raw), 6000), 500):
            raw[at] ^= 0xFF
          f.seek(0)
          f.write(raw)
  corrupt = broken("corrupt", flip)
  done = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), f"--workdir={workdir}",
                         *flags_for(prepared(corrupt, **more))], cwd=REPO, env=ENV,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 1
  last = done.stderr.strip().splitlines()[-1]
  assert re.fullmatch(r"error: ValueError: prepared shard .*train-\d+.array_record is "
                      r"corrupt: .*", last), last
  assert ckpt_lib.make_manager(workdir, read_only=True).all_steps() == [6, 12]
  assert_trees_equal(final_params(workdir), final_params(ref_dir))

