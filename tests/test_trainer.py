"""The pretraining loop end to end on a tiny config: loss falls, resume (also after SIGKILL) is
exact, eval.py prints its JSON, bad input fails with one line and keeps what was saved."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import default as default_config
from pkm_jax import checkpoint as ckpt_lib
from pkm_jax import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {
    "model.hidden_size": 32, "model.num_layers": 2, "model.num_heads": 2,
    "model.intermediate_size": 64, "model.max_position_embeddings": 32,
    "memory.layers": (1,), "memory.n_keys": 16, "memory.heads": 2, "memory.k": 4,
    "memory.k_dim": 16,
    "data.vocab_size": 400, "data.max_len": 32, "data.batch_size": 8,
    "data.generated.num_entities": 40, "data.generated.num_docs": 300,
    "optim.warmup_steps": 2,
    "train.steps": 12, "train.log_every": 4, "train.eval_every": 6,
    "train.checkpoint_every": 6, "train.keep_checkpoints": 3, "train.eval_batches": 2,
    "train.memory_stats_every": 6,
}


def tiny_config(**overrides):
  config = default_config.get_config()
  for key, value in {**TINY, **overrides}.items():
    group, *rest = key.split(".")
    node = config[group]
    for part in rest[:-1]:
      node = node[part]
    node[rest[-1]] = value
  return config


def flags_for(overrides: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def final_params(workdir):
  model, _, _ = ckpt_lib.restore_model(workdir)
  from flax import nnx
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def assert_trees_equal(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """One uninterrupted 12-step run (checkpoints at 6 and 12) that other tests compare with."""
  workdir = str(tmp_path_factory.mktemp("ref"))
  result = trainer.train_and_evaluate(tiny_config(), workdir)
  return workdir, result


SPARSE = {"optim.values_optimizer": "sparse_adam"}


@pytest.fixture(scope="module")
def sparse_reference_run(tmp_path_factory):
  """The reference run with sparse value updates (row-wise optimizer state in the checkpoint)."""
  workdir = str(tmp_path_factory.mktemp("ref_sparse"))
  return workdir, trainer.train_and_evaluate(tiny_config(**SPARSE), workdir)


def test_run_writes_checkpoints_and_metrics(reference_run):
  workdir, result = reference_run
  assert sorted(ckpt_lib.make_manager(workdir, read_only=True).all_steps()) == [6, 12]
  for name in ("config.json", "model_config.json", "tokenizer.json"):
    assert os.path.exists(os.path.join(workdir, name))
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert result["step"] == 12 and np.isfinite(result["mlm_loss"])
  stats = result["memory"]["1"]
  assert 0 < stats["usage"] <= 100 and 0 < stats["top1_usage"] <= stats["usage"]
  assert 0 <= stats["kl_uniform"] <= np.log(16**2)


@pytest.mark.parametrize("run, overrides", [("reference_run", {}),
                                           ("sparse_reference_run", SPARSE)])
def test_resume_from_checkpoint_is_exact(request, run, overrides, tmp_path):
  ref_dir, _ = request.getfixturevalue(run)
  # Pretend the run died after step 6: drop the final checkpoint and run the same config again.
  workdir = str(tmp_path / "resumed")
  shutil.copytree(ref_dir, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "12"))
  trainer.train_and_evaluate(tiny_config(**overrides), workdir)
  assert_trees_equal(final_params(workdir), final_params(ref_dir))


def test_resume_with_another_values_optimizer_is_refused(reference_run, tmp_path):
  ref_dir, _ = reference_run
  workdir = str(tmp_path / "switched")
  shutil.copytree(ref_dir, workdir)
  with pytest.raises(ValueError, match="values_optimizer='adam', not 'sparse_adam'"):
    trainer.train_and_evaluate(tiny_config(**SPARSE, **{"train.steps": 14}), workdir)
  assert sorted(ckpt_lib.make_manager(workdir, read_only=True).all_steps()) == [6, 12]


def test_training_lowers_loss(tmp_path):
  workdir = str(tmp_path / "learn")
  first = trainer.train_and_evaluate(
      tiny_config(**{"train.steps": 1, "train.eval_batches": 4}), workdir)
  later = trainer.train_and_evaluate(
      tiny_config(**{"train.steps": 80, "train.eval_batches": 4, "train.eval_every": 80,
                     "train.checkpoint_every": 80, "optim.lr": 3e-3}), workdir)
  # The held-out MLM loss starts near log(vocab = 400) ~ 6.0 and must fall clearly within 80
  # steps (to ~5.3 measured: below the uniform guess, the model has learnt token statistics).
  assert later["mlm_loss"] < first["mlm_loss"] - 0.5, (first["mlm_loss"], later["mlm_loss"])


def test_sigkill_after_checkpoint_then_rerun_matches(reference_run, tmp_path):
  ref_dir, _ = reference_run
  workdir = str(tmp_path / "killed")
  cmd = [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={workdir}",
         *flags_for(TINY)]
  # Same devices and matmul precision as this test process (conftest), so the runs can match.
  env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
         "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  first_ckpt = os.path.join(workdir, "checkpoints", "6")
  deadline = time.time() + 240
  while not os.path.isdir(first_ckpt) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL, "the run ended before it was killed"
  assert os.path.isdir(first_ckpt), "the run never wrote its first checkpoint"
  killed_at = ckpt_lib.make_manager(workdir, read_only=True).all_steps()
  assert 12 not in killed_at, "the run had finished before the kill: nothing was resumed"
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert_trees_equal(final_params(workdir), final_params(ref_dir))


def test_eval_cli_prints_json_and_saves_it(reference_run):
  workdir, _ = reference_run
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "eval.py"), f"--workdir={workdir}",
       *flags_for(TINY)], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert set(result) >= {"step", "mlm_loss", "mlm_perplexity", "mlm_accuracy", "memory"}
  assert result["step"] == 12
  assert result["mlm_perplexity"] == pytest.approx(np.exp(result["mlm_loss"]), rel=1e-6)
  assert set(result["memory"]) == {"1"}
  assert set(result["memory"]["1"]) == {"usage", "top1_usage", "kl_uniform", "kl_weighted"}
  with open(os.path.join(workdir, "eval", "metrics.json")) as f:
    assert json.load(f) == result


def test_eval_of_an_earlier_step_and_missing_step(reference_run):
  workdir, _ = reference_run
  config = tiny_config()
  from pkm_jax import evaluate
  assert evaluate.evaluate_workdir(config, workdir, step=6)["step"] == 6
  with pytest.raises(FileNotFoundError, match="no checkpoint for step 7"):
    evaluate.evaluate_workdir(config, workdir, step=7)


@pytest.mark.parametrize("checkpoint_every", [6, 1])
def test_divergence_stops_without_overwriting(reference_run, tmp_path, checkpoint_every):
  ref_dir, _ = reference_run
  workdir = str(tmp_path / "nan")
  shutil.copytree(ref_dir, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "12"))
  before = final_params(workdir)
  # A learning rate that overflows float32: step 7's update turns the params into inf/NaN while
  # its own loss (computed before the update) is still finite. With checkpoint_every=1 step 7
  # is a checkpoint step, so a loss-only check would save the spoilt params.
  overflow = {"optim.lr": 1e39, "train.checkpoint_every": checkpoint_every}
  with pytest.raises(FloatingPointError, match="diverged at step 7"):
    trainer.train_and_evaluate(tiny_config(**overflow), workdir)
  assert sorted(ckpt_lib.make_manager(workdir, read_only=True).all_steps()) == [6]
  assert_trees_equal(final_params(workdir), before)


@pytest.mark.parametrize("flag, message", [
    ("--config.model.hiden_size=8", "hiden_size"),
    ("--config.memory.layers=(0,9)", "memory.layers"),
    ("--config.memory.k=999", "memory.k"),
    ("--config.memory.mode=residul", "memory.mode"),
    ("--config.train.log_every=0", "train.log_every"),
    ("--config.optim.decay=linaer", "optim.decay"),
    ("--config.optim.lr=-1", "optim.lr"),
    ("--config.mesh.rules=(('slots','modle'),)", "unknown mesh axes ['modle']"),
    ("--config.data.batch_size=6", "do not split over the 8 devices"),
])
def test_cli_config_errors_are_one_line(tmp_path, flag, message):
  workdir = tmp_path / "bad"
  out = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), f"--workdir={workdir}",
                        "--config.train.steps=1", flag], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode != 0
  last = out.stderr.strip().splitlines()[-1]
  assert message in last and last.startswith("error:"), out.stderr[-1000:]
  assert not (workdir / "checkpoints").exists()


def test_corrupt_checkpoint_is_reported(reference_run, tmp_path):
  ref_dir, _ = reference_run
  workdir = str(tmp_path / "corrupt")
  shutil.copytree(ref_dir, workdir)
  params_dir = os.path.join(workdir, "checkpoints", "12", "params")
  for root, _, files in os.walk(params_dir):
    for name in files:
      if name != "_METADATA":
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"garbage")
  with pytest.raises(ValueError, match="checkpoint step 12 .* is corrupt: .*params/.* does not "
                                       "match its checksum"):
    ckpt_lib.restore_model(workdir)
  # Without its manifest (a checkpoint from before checksums) orbax's own error is reported.
  os.remove(os.path.join(workdir, "checkpoints", "12", "checksums.sha256"))
  with pytest.raises(ValueError, match="could not be restored .*it has no checksums"):
    ckpt_lib.restore_model(workdir)


def test_init_from_dense_workdir_reproduces_it(tmp_path):
  # +Init +ResM from a dense run, with zero values and no learning: the memory adds exactly 0,
  # so the held-out loss equals the dense model's. PKM from the same run drops its FFN tensors.
  dense_dir, resm_dir = str(tmp_path / "dense"), str(tmp_path / "resm")
  dense = trainer.train_and_evaluate(tiny_config(**{"memory.mode": "none"}), dense_dir)
  frozen = {"optim.lr": 0.0, "optim.values_lr": 0.0, "train.steps": 1,
            "memory.value_zero_init": True}
  config = tiny_config(**frozen)
  config.init.pretrained = dense_dir
  resm = trainer.train_and_evaluate(config, resm_dir)
  assert resm["mlm_loss"] == pytest.approx(dense["mlm_loss"], abs=1e-5)
  # The ResM run took the dense run's tokenizer and every dense tensor.
  with open(os.path.join(dense_dir, "tokenizer.json")) as a, \
       open(os.path.join(resm_dir, "tokenizer.json")) as b:
    assert a.read() == b.read()
  dense_params = jax.tree_util.tree_flatten_with_path(final_params(dense_dir))[0]
  resm_params = dict(jax.tree_util.tree_flatten_with_path(final_params(resm_dir))[0])
  for path, value in dense_params:
    np.testing.assert_array_equal(resm_params[path], value)
