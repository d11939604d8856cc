"""host_memory: a command re-executes itself with glibc's huge-page tunable only when asked
(PKM_JAX_HUGE_PAGES=1), then keeping its pid and arguments, and XLA's fresh host buffers then
fault far fewer pages; unasked, one interpreter with the user's environment."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from pkm_jax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = ("glibc", "2.36")


ASK = {"PKM_JAX_HUGE_PAGES": "1"}


@pytest.mark.parametrize("env, libc, mode, want", [
    ({}, GLIBC, "madvise", False),  # not asked: nothing
    (ASK, GLIBC, "madvise", True),
    ({**ASK, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, "madvise", True),
    (ASK, ("glibc", "2.34"), "madvise", False),  # the tunable came with 2.35
    (ASK, ("glibc", "2.35"), "madvise", True),
    (ASK, ("", ""), "madvise", False),  # musl, or not known
    (ASK, ("glibc", "x"), "madvise", False),
    (ASK, GLIBC, "always", False),  # every mapping gets huge pages already
    (ASK, GLIBC, "never", False),  # none can
    (ASK, GLIBC, "", False),
    ({"PKM_JAX_HUGE_PAGES": "0"}, GLIBC, "madvise", False),
    ({**ASK, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, GLIBC, "madvise", False),  # re-executed
    ({**ASK, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "madvise", False),  # the user's
    ({**ASK, "PKM_JAX_HUGE_PAGES_DONE": "1"}, GLIBC, "madvise", False),  # glibc dropped it
])
def test_wants_tunable(env, libc, mode, want):
  assert host_memory.wants_tunable(env, libc, mode) is want


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert host_memory.thp_mode(str(path)) == "madvise"
  path.write_text("[always] madvise never\n")
  assert host_memory.thp_mode(str(path)) == "always"
  assert host_memory.thp_mode(str(tmp_path / "missing")) == ""


def plain_env(**extra):
  """This environment without the tunable (conftest gives it to every process it starts)."""
  env = {k: v for k, v in os.environ.items() if k not in (host_memory.ENV, host_memory.OPT_IN)}
  return {**env, "PYTHONPATH": REPO, **extra}


needs_madvise = pytest.mark.skipif(
    host_memory.huge_pages_env(plain_env(**ASK)) is None,
    reason=f"huge pages by madvise not available here (THP mode {host_memory.thp_mode()!r}, "
           f"{platform.libc_ver()})")


def test_existing_tunables_are_kept():
  env = host_memory.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "b",
                                    **ASK}, libc=GLIBC, mode="madvise")
  if sys.platform.startswith("linux"):
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "A": "b",
                   **ASK}
  assert host_memory.huge_pages_env({}, libc=GLIBC, mode="never") is None


PROBE = textwrap.dedent("""
    import os, sys
    print("before", os.getpid(), flush=True)
    from pkm_jax import cli
    def main(argv):
      print("after", os.getpid(), os.environ.get("GLIBC_TUNABLES"), argv[1:])
    cli.run(main)
""")


@needs_madvise
@pytest.mark.parametrize("how", ["-c", "-m"])
def test_cli_command_reexecutes_with_tunable_same_pid_and_args(tmp_path, how):
  (tmp_path / "reexec_probe.py").write_text(PROBE)
  run = [sys.executable, "-c", PROBE] if how == "-c" else [sys.executable, "-m", "reexec_probe"]
  env = plain_env(PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}", **ASK)
  proc = subprocess.run(run + ["x", "y z"], env=env, capture_output=True, text=True,
                        timeout=120, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  pid = lines[0].split()[1]
  # The same process ran the script twice: once without, once with the tunable.
  assert lines == [f"before {pid}", f"before {pid}",
                   f"after {pid} glibc.malloc.hugetlb=1 ['x', 'y z']"]
  # Unasked (the default): one interpreter, the user's environment.
  for value in (None, "0"):
    unasked = {k: v for k, v in env.items() if k != "PKM_JAX_HUGE_PAGES"}
    if value is not None:
      unasked["PKM_JAX_HUGE_PAGES"] = value
    off = subprocess.run(run, env=unasked, capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert off.returncode == 0, off.stderr
    pid = off.stdout.split()[1]
    assert off.stdout.splitlines() == [f"before {pid}", f"after {pid} None []"]


@needs_madvise
def test_train_py_bad_flag_reexecuted_still_one_line():
  """train.py re-executes (asked) before its flags are parsed: a bad flag still ends in one
  line."""
  proc = subprocess.run([sys.executable, "train.py", "--config.nope=1"], env=plain_env(**ASK),
                        capture_output=True, text=True, timeout=120, cwd=REPO)
  assert proc.returncode != 0 and proc.stdout == ""
  assert proc.stderr.strip().splitlines() == ["error: config.nope is not a key of this config "
                                              "(--config.nope)"]


@needs_madvise
def test_fresh_xla_buffers_fault_fewer_pages():
  """A jitted function's fresh 128 MB output: one fault per 4 KiB page without the tunable
  (~32,000 per call), far fewer with it."""
  script = textwrap.dedent("""
      import resource, jax, jax.numpy as jnp
      f = jax.jit(lambda u: u * 2.0)
      u = jnp.ones((32768, 1024), jnp.float32)
      jax.block_until_ready(f(u))
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      for _ in range(3):
        jax.block_until_ready(f(u))
      print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
  """)

  def faults(env):
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split()[-1])

  plain = faults(plain_env(XLA_FLAGS=""))
  huge = faults(host_memory.huge_pages_env(plain_env(XLA_FLAGS="", **ASK)))
  assert plain > 25_000, plain
  assert huge < plain / 10, (huge, plain)
