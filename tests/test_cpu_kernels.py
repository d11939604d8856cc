"""pkm_jax.cpu_kernels: the CPU custom calls build once into the cache (safely when processes
start together), in a private temporary folder when the cache cannot be made, and fall back to
the pure-JAX ops, with one warning, when they cannot be built or loaded."""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("PKM_JAX_CPU_KERNELS") == "0",
                                reason="the custom calls are turned off (PKM_JAX_CPU_KERNELS=0)")


def _run(code: str, **env) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                        text=True, env={**os.environ, **env}, timeout=300)


# Each kernel's op, and whether the CPU lowering holds its custom call.
CHECK = """
    import warnings
    warnings.simplefilter("always")
    import jax, jax.numpy as jnp
    from pkm_jax import cpu_kernels, cpu_lookup, cpu_top_k, sparse_adam
    x = jnp.asarray([[3.0, 1.0, 2.0, 3.0]])
    v, i = jax.jit(lambda x: cpu_top_k.top_k(x, 2))(x)
    ids, grads = jax.jit(lambda i, w, g: sparse_adam.row_gradients(i, w, g, num_rows=4))(
        jnp.asarray([[[[2, 0]]]]), jnp.asarray([[[[1.0, 2.0]]]]), jnp.asarray([[[1.0]]]))
    table, picks, weights = jnp.asarray([[1.0, 2.0], [3.0, 4.0]]), jnp.asarray([[[[1, 0]]]]), \
        jnp.asarray([[[[1.0, 2.0]]]])
    out = jax.jit(cpu_lookup.weighted_lookup)(table, picks, weights)
    texts = (jax.jit(lambda x: cpu_top_k.top_k(x, 2)).lower(x).as_text()
             + jax.jit(lambda i, w, g: sparse_adam.row_gradients(i, w, g, num_rows=4)).lower(
                 jnp.zeros((1, 1, 1, 2), jnp.int32), jnp.zeros((1, 1, 1, 2)),
                 jnp.zeros((1, 1, 1))).as_text()
             + jax.jit(jax.grad(lambda t: jnp.sum(cpu_lookup.weighted_lookup(t, picks, weights)))
                       ).lower(table).as_text())
    print(cpu_kernels.available(), i.tolist(), ids.tolist(), grads.ravel().tolist(),
          out.ravel().tolist(), sum(t in texts for t in cpu_kernels.TARGETS))
"""
ON = "True [[0, 3]] [0, 2] [2.0, 1.0] [5.0, 8.0] 3"
OFF = "False [[0, 3]] [0, 2] [2.0, 1.0] [5.0, 8.0] 0"


def test_build_cache_and_fallbacks(tmp_path):
  """Built once into PKM_JAX_CACHE_DIR (two processes starting together leave one whole
  library), or in a private folder under the temporary one when that cannot be made (never in
  one others can write to); a missing compiler or a library without a handler: one warning and
  the pure-JAX ops; PKM_JAX_CPU_KERNELS=0 turns them off."""
  cache = tmp_path / "cache"
  procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(CHECK)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PKM_JAX_CACHE_DIR": str(cache)})
           for _ in range(2)]
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert out.split("\n")[0] == ON
  assert [f.suffix for f in cache.iterdir()] == [".so"]  # one library, no leftovers

  # A cache folder that cannot be made: built in a private folder under the temporary one;
  # a temporary folder others can write to (a library planted there) is never used.
  (tmp_path / "file").write_text("")
  temp = tmp_path / "temp"
  temp.mkdir()
  fallback = _run(CHECK, PKM_JAX_CACHE_DIR=str(tmp_path / "file" / "cache"), TMPDIR=str(temp))
  assert fallback.returncode == 0 and fallback.stdout.startswith(ON), fallback.stderr
  private = temp / f"pkm_jax-{os.getuid()}"
  assert [f.suffix for f in private.iterdir()] == [".so"] and private.stat().st_mode & 0o077 == 0
  private.chmod(0o777)
  shared = _run(CHECK, PKM_JAX_CACHE_DIR=str(tmp_path / "file" / "cache"), TMPDIR=str(temp))
  assert shared.returncode == 0 and shared.stdout.startswith(OFF)
  assert "not a private folder" in shared.stderr
  # A library that loads but lacks the handlers: one warning, the pure-JAX ops.
  odd = tmp_path / "odd"
  odd.mkdir()
  subprocess.run(["c++", "-shared", "-fPIC", "-x", "c++", "-", "-o", str(odd / "lib.so")],
                 input="int unrelated() { return 0; }", text=True, check=True)
  broken_lib = _run("""
      import warnings
      warnings.simplefilter("always")
      from pathlib import Path
      from pkm_jax import cpu_kernels
      cpu_kernels.build = lambda: Path(%r)
      print(cpu_kernels.available())
  """ % str(odd / "lib.so"))
  assert broken_lib.returncode == 0 and broken_lib.stdout.strip() == "False", broken_lib.stderr
  assert broken_lib.stderr.count("RuntimeWarning") == 1 and "PkmTopKF32" in broken_lib.stderr

  broken = _run(CHECK, PKM_JAX_CACHE_DIR=str(tmp_path / "none"), CXX="no-such-compiler++")
  assert broken.returncode == 0, broken.stderr
  assert broken.stdout.split("\n")[0] == OFF
  assert broken.stderr.count("RuntimeWarning") == 1 and "no-such-compiler++" in broken.stderr
  off = _run(CHECK, PKM_JAX_CACHE_DIR=str(tmp_path / "off"), PKM_JAX_CPU_KERNELS="0")
  assert off.returncode == 0 and off.stdout.split("\n")[0] == OFF, off.stderr
  assert not (tmp_path / "off").exists()


def test_caches_others_can_write_or_own_are_refused(tmp_path):
  """A group-writable cache folder, a library others can write to, or one another user owns:
  one warning, nothing loaded from there, the pure-JAX ops."""
  shared = tmp_path / "shared"
  shared.mkdir()
  shared.chmod(0o775)
  proc = _run(CHECK, PKM_JAX_CACHE_DIR=str(shared))
  assert proc.returncode == 0 and proc.stdout.startswith(OFF), proc.stderr
  assert proc.stderr.count("RuntimeWarning") == 1 and "can be written by others" in proc.stderr
  assert not list(shared.iterdir())
  private = tmp_path / "private"
  built = _run(CHECK, PKM_JAX_CACHE_DIR=str(private))
  assert built.stdout.startswith(ON), built.stderr
  (library,) = private.iterdir()
  library.chmod(0o666)
  proc = _run(CHECK, PKM_JAX_CACHE_DIR=str(private))
  assert proc.stdout.startswith(OFF) and "can be written by others" in proc.stderr
  library.chmod(0o755)
  if os.getuid() == 0:  # root can hand the library to another user
    os.chown(library, 65534, 65534)
    proc = _run(CHECK, PKM_JAX_CACHE_DIR=str(private))
    assert proc.stdout.startswith(OFF) and "not owned by this user" in proc.stderr


def test_nothing_is_built_or_loaded_off_the_cpu(tmp_path):
  """With a GPU as jax's default backend (jax.default_backend patched: this machine has none),
  tracing and exporting the memory layer for cuda runs no compiler and loads no library."""
  proc = _run("""
      import ctypes, subprocess, jax
      calls = []
      def refuse(*args, **kwargs):  # recorded: the old code swallowed a build's failure
        calls.append(args[:1])
        raise OSError(f"called off the CPU: {args[:1]}")
      jax.default_backend = lambda: "gpu"
      subprocess.run = subprocess.Popen = ctypes.cdll.LoadLibrary = refuse
      import jax.numpy as jnp
      from flax import nnx
      from jax import export
      from pkm_jax import cpu_kernels, architecture, memory
      cfg = architecture.MemoryConfig(n_keys=8, k=4, k_dim=16, heads=2, v_dim=32)
      layer = memory.ProductKeyMemory(32, cfg, rngs=nnx.Rngs(0))
      graphdef, state = nnx.split(layer)
      def loss(state, x):
        return jnp.sum(nnx.merge(graphdef, state)(x, jnp.ones(x.shape[:2]))[0])
      x = jnp.ones((2, 8, 32))
      exported = export.export(jax.jit(jax.value_and_grad(loss)), platforms=("cuda",))(state, x)
      text = exported.mlir_module()
      assert not any(t in text for t in cpu_kernels.TARGETS)
      print(cpu_kernels.available(), len(calls))
  """, PKM_JAX_CACHE_DIR=str(tmp_path / "cache"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ["False", "0"] and not (tmp_path / "cache").exists()
