"""`top_k`: jax.lax.top_k, computed on CPUs by this package's XLA FFI custom call.

XLA:CPU's TopK partial-sorts an index array per row through a comparator: its cost grows with
n * k (8,192 rows of 512 scores, k = 32: ~54 ms on two cores, most of the memory layer's search).
`csrc/top_k.cc` returns the same indices, ties and NaNs ordered alike, from one pass per row
that inserts only the elements beating the current k-th, its rows split over XLA's intra-op
threads (3.4-4.8x faster on two cores); the values are gathered at those indices. On GPUs and
TPUs, and for dtypes other than float32, `top_k` is `jax.lax.top_k`.

The library is compiled on first use with the system's C++ compiler (`$CXX`, else `c++`) against
jaxlib's FFI headers, into `$PKM_JAX_CACHE_DIR` (default `~/.cache/pkm_jax`; a per-user folder
under the system's temporary one where that cannot be written), named by a hash of the source,
jaxlib's version and the command. Without a compiler, or with `PKM_JAX_CPU_TOP_K=0`,
`top_k` is `jax.lax.top_k` everywhere (with one warning when the build failed).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

SOURCE = Path(__file__).parent / "csrc" / "top_k.cc"
TARGET = "pkm_jax_top_k_f32"
MAX_K = 1024  # the kernel's buffer (csrc/top_k.cc kMaxK)


def cache_dir() -> Path:
  default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pkm_jax"
  return Path(os.environ.get("PKM_JAX_CACHE_DIR", default))


def compile_command(out: Path) -> list[str]:
  return [os.environ.get("CXX", "c++"), "-O3", "-std=c++17", "-shared", "-fPIC", "-w",
          f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(out)]


def build() -> Path:
  """The compiled library, built if this source, jaxlib and command have none yet (raises
  OSError / subprocess.CalledProcessError when it cannot be built)."""
  key = hashlib.sha256()
  key.update(SOURCE.read_bytes())
  key.update(jaxlib.__version__.encode())
  key.update(" ".join(compile_command(Path("lib.so"))).encode())
  name = f"top_k-{key.hexdigest()[:16]}.so"
  # A read-only home (some clusters, CI sandboxes) falls back to a per-user temporary folder.
  folders = [cache_dir(), Path(tempfile.gettempdir()) / f"pkm_jax-{os.getuid()}"]
  for folder in folders:
    if (folder / name).is_file():
      return folder / name
  compiler = compile_command(Path(name))[0]
  if shutil.which(compiler) is None:
    raise OSError(f"no C++ compiler {compiler!r} on PATH")
  for folder in folders:
    try:
      folder.mkdir(parents=True, exist_ok=True)
      # Built beside its final name and renamed: concurrent first uses (test workers, hosts
      # sharing a home) each see either no library or a whole one.
      fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
      break
    except OSError as e:
      error = e
  else:
    raise error
  os.close(fd)
  try:
    subprocess.run(compile_command(Path(tmp)), check=True, capture_output=True, text=True)
    os.replace(tmp, folder / name)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return folder / name


@functools.cache
def available() -> bool:
  """Whether the custom call is built and registered for CPUs (once per process)."""
  if os.environ.get("PKM_JAX_CPU_TOP_K", "1") == "0":
    return False
  try:
    library = ctypes.cdll.LoadLibrary(str(build()))
  except (OSError, subprocess.CalledProcessError) as e:
    detail = getattr(e, "stderr", "") or str(e)
    warnings.warn(f"pkm_jax.cpu_top_k: building {SOURCE.name} failed, using jax.lax.top_k on "
                  f"CPU ({detail.strip().splitlines()[-1] if detail.strip() else e!r})",
                  RuntimeWarning, stacklevel=2)
    return False
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.PkmTopKF32), platform="cpu")
  return True


def _custom_call(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  # The scores' type with another shape: inside a shard_map the indices then vary over the mesh
  # axes the scores vary over, as jax.lax.top_k's do.
  out = jax.typeof(x).update(shape=x.shape[:-1] + (k,), dtype=jnp.dtype(jnp.int32))
  indices = jax.ffi.ffi_call(TARGET, out, vmap_method="broadcast_all")(jax.lax.stop_gradient(x))
  # Gathered (exact bits, and differentiable as jax.lax.top_k's values: the tangent of each is
  # the input's tangent at its index).
  return jnp.take_along_axis(x, indices, axis=-1), indices


def _lax_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  return tuple(jax.lax.top_k(x, k))


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """jax.lax.top_k(x, k): x [..., n] -> values, indices [..., k], best first, ties to the lower
  index; the custom call on CPU for float32 (see the module docstring)."""
  if x.dtype != jnp.float32 or not 1 <= k <= min(x.shape[-1], MAX_K) or not available():
    return _lax_top_k(x, k)
  # The platform the computation is lowered for picks the branch: exports for GPU/TPU never see
  # the CPU-only custom call.
  return jax.lax.platform_dependent(
      x, cpu=functools.partial(_custom_call, k=k), default=functools.partial(_lax_top_k, k=k))
