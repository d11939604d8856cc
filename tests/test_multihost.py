"""Two processes x 4 CPU devices on loopback train like one process with 8 devices.

`train.py --coordinator_address/--num_processes/--process_id` runs twice (gloo CPU collectives),
each process feeding only its half of every global batch into one 4x2 ('data' x 'model') mesh
that spans both, and orbax writing one checkpoint from both; then both resume from a middle
checkpoint, each restoring its own shards. The reference is the same config trained in this
8-device test process: the multi-host run must end with the same parameters (read back with
`restore_model`) and the same held-out loss, both times. A hang (a process waiting on its
peer) is bounded by a deadline after which both processes are killed.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import re  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from pkm_jax import checkpoint as ckpt_lib  # noqa: E402
from pkm_jax import trainer  # noqa: E402
from test_sharded_training import SHORT, assert_params_close  # noqa: E402
from test_trainer import REPO, TINY, final_params, flags_for, tiny_config  # noqa: E402

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


def run_two_hosts(workdir: str, logdir, **overrides) -> list[str]:
  """Runs both processes to completion (or kills both); returns their outputs."""
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
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
    outputs = []
    for log in logs:
      log.seek(0)
      outputs.append(log.read())
      log.close()
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"host {i} exited with {p.returncode}:\n{out[-3000:]}"
  return outputs


def test_two_hosts_train_and_resume_like_one(tmp_path):
  ref_dir, multi_dir = str(tmp_path / "one_host"), str(tmp_path / "two_hosts")
  want = trainer.train_and_evaluate(tiny_config(**OVERRIDES), ref_dir)
  steps, middle = OVERRIDES["train.steps"], 3
  # Checkpoints at 3 and 5; the run's results do not depend on when it saves.
  ckpt = {"train.checkpoint_every": middle}

  def check(outputs):
    for out in outputs:  # both hosts computed the same global eval
      match = FINISHED.search(out)
      assert match, out[-2000:]
      assert int(match.group(1)) == steps
      assert float(match.group(2)) == pytest.approx(want["mlm_loss"], abs=1e-4)  # 4 dp printed
    # Checkpoints written by both processes together, readable here on one device.
    assert ckpt_lib.make_manager(multi_dir, read_only=True).all_steps() == [middle, steps]
    assert_params_close(final_params(multi_dir), final_params(ref_dir))

  check(run_two_hosts(multi_dir, tmp_path, **ckpt))
  # As if both hosts died after step 3: both restore their shards of that checkpoint (state and
  # data iterator) and must finish exactly as the uninterrupted one-process run did.
  shutil.rmtree(os.path.join(multi_dir, "checkpoints", str(steps)))
  outputs = run_two_hosts(multi_dir, tmp_path, **ckpt)
  resumed = f"Resuming {multi_dir} from step {middle}"
  assert all(resumed in out for out in outputs), outputs[0][-2000:]
  check(outputs)
