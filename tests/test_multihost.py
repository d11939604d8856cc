"""Two processes x 4 CPU devices on loopback train like one process with 8 devices.

`train.py --coordinator_address/--num_processes/--process_id` runs twice (gloo CPU collectives),
each process reading only its half of every global batch from prepared data (ArrayRecord
shards, `data.source=prepared`) into one 4x2 ('data' x 'model') mesh that spans both, and orbax
writing one checkpoint from both. The reference is the same config trained in this 8-device
test process: the multi-host run must end with the same parameters (read back with
`restore_model`) and the same held-out loss. Then a second two-host run is killed with SIGKILL
after its middle checkpoint and started again: both hosts restore their shards (state and data
iterator) and must end with exactly the parameters of the uninterrupted two-host run. A hang (a
process waiting on its peer) is bounded by a deadline after which both processes are killed.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import re  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from pkm_jax import checkpoint as ckpt_lib  # noqa: E402
from pkm_jax import trainer  # noqa: E402
from pkm_jax.data import prepare as prepare_lib  # noqa: E402
from test_prepare import MAX_LEN, write_corpus  # noqa: E402
from test_sharded_training import SHORT, assert_params_close  # noqa: E402
from test_trainer import (REPO, TINY, assert_trees_equal, final_params, flags_for,  # noqa: E402
                          tiny_config)

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")

# Rows over 'model' (2 ways, each pair of devices inside one process) and the batch over 'data'
# (4 ways, two per process); sparse value updates and BatchNorm statistics over the global batch.
# Live usage statistics on: their [N] totals must come back readable on every host.
OVERRIDES = {**SHORT, "mesh.data": 4, "mesh.model": 2, "optim.values_optimizer": "sparse_adam",
             "train.memory_stats_every": 5}
DEADLINE_S = 300
FINISHED = re.compile(r"Finished: .* step (\d+) eval mlm_loss=([-\d.]+)")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_two_hosts(workdir: str, logdir, kill_after: str = "", **overrides) -> list[str]:
  """Runs both processes to completion (or kills both); returns their outputs.

  With `kill_after` (a checkpoint folder), both are killed with SIGKILL once it exists.
  """
  address = f"127.0.0.1:{free_port()}"
  # This process's XLA flags (conftest) but 4 devices a process; matmul precision as conftest.
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", ""))
  env = {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=4".strip(),
         "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
  procs, logs = [], []
  try:
    for i in range(2):
      log = open(logdir / f"host{i}.log", "w+")
      logs.append(log)
      cmd = [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={workdir}",
             f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}",
             *flags_for({**TINY, **OVERRIDES, **overrides})]
      procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                    stderr=subprocess.STDOUT))
    deadline = time.time() + DEADLINE_S
    while time.time() < deadline and any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs):
        break  # one failed: its peer would wait for it until the coordinator gives up
      if kill_after and os.path.isdir(kill_after):
        for p in procs:
          p.send_signal(signal.SIGKILL)
        break
      time.sleep(0.005 if kill_after else 0.2)
  finally:
    for p in procs:
      if p.poll() is None and not kill_after:
        p.kill()
      p.wait()
    outputs = []
    for log in logs:
      log.seek(0)
      outputs.append(log.read())
      log.close()
  want = -signal.SIGKILL if kill_after else 0
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == want, f"host {i} exited with {p.returncode}:\n{out[-3000:]}"
  return outputs


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """A prepared folder (several shards, an eval split) both hosts read from."""
  root = tmp_path_factory.mktemp("data")
  prepare_lib.prepare(str(root / "prepared"), inputs=write_corpus(root / "text", num_docs=300),
                      vocab_size=400, max_len=MAX_LEN, eval_fraction=0.1, rows_per_shard=64,
                      workers=1, progress=False)
  return {"data.source": "prepared", "data.path": str(root / "prepared"),
          "data.max_len": MAX_LEN}


def test_two_hosts_train_like_one_and_resume_after_sigkill(prepared, tmp_path):
  ref_dir = str(tmp_path / "one_host")
  whole, killed = str(tmp_path / "two_hosts"), str(tmp_path / "killed")
  want = trainer.train_and_evaluate(tiny_config(**OVERRIDES, **prepared), ref_dir)
  steps, middle = OVERRIDES["train.steps"], 3
  # Checkpoints at 3 and 5; the run's results do not depend on when it saves.
  ckpt = {"train.checkpoint_every": middle, **prepared}

  def check(outputs, workdir):
    for out in outputs:  # both hosts computed the same global eval
      match = FINISHED.search(out)
      assert match, out[-2000:]
      assert int(match.group(1)) == steps
      assert float(match.group(2)) == pytest.approx(want["mlm_loss"], abs=1e-4)  # 4 dp printed
    # Checkpoints written by both processes together, readable here on one device.
    assert ckpt_lib.make_manager(workdir, read_only=True).all_steps() == [middle, steps]
    assert_params_close(final_params(workdir), final_params(ref_dir))

  check(run_two_hosts(whole, tmp_path, **ckpt), whole)
  # Both hosts killed once checkpoint 3 exists, then started again: each restores its shards of
  # that checkpoint (state and data iterator) and must finish exactly as the uninterrupted
  # two-host run did.
  run_two_hosts(killed, tmp_path, kill_after=os.path.join(killed, "checkpoints", str(middle)),
                **ckpt)
  assert steps not in ckpt_lib.make_manager(killed, read_only=True).all_steps()
  outputs = run_two_hosts(killed, tmp_path, **ckpt)
  resumed = f"Resuming {killed} from step {middle}"
  assert all(resumed in out for out in outputs), outputs[0][-2000:]
  check(outputs, killed)
  assert_trees_equal(final_params(killed), final_params(whole))
