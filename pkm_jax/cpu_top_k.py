"""`top_k`: jax.lax.top_k, computed on CPUs by this package's XLA FFI custom call.

XLA:CPU's TopK partial-sorts an index array per row through a comparator: its cost grows with
n * k (8,192 rows of 512 scores, k = 32: ~54 ms on two cores, most of the memory layer's search).
`csrc/top_k.cc` returns the same indices, ties and NaNs ordered alike, from one pass per row
that inserts only the elements beating the current k-th, its rows split over XLA's intra-op
threads (3.4-4.8x faster on two cores); the values are gathered at those indices. On GPUs and
TPUs, and for dtypes other than float32, `top_k` is `jax.lax.top_k`.

The library is compiled on first use with the system's C++ compiler (`$CXX`, else `c++`) against
jaxlib's FFI headers, into `$PKM_JAX_CACHE_DIR` (default `~/.cache/pkm_jax`; where that cannot
be made, a private per-user folder under the system's temporary one), named by a hash of the
source, jaxlib's version, the machine, the compiler and the command. Without a compiler, or with
`PKM_JAX_CPU_TOP_K=0`, `top_k` is `jax.lax.top_k` everywhere (with one warning when the build
failed). A computation exported with `jax.export` for CPU carries the custom call, which
jax.export refuses by default: export with `PKM_JAX_CPU_TOP_K=0` (GPU/TPU exports never see it).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import stat
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
  return [*shlex.split(os.environ.get("CXX", "c++")), "-O3", "-std=c++17", "-shared", "-fPIC",
          "-w", f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(out)]


def _private_temp_dir() -> Path:
  """A per-user folder under the system's temporary one, used only if no one else owns it or
  can write to it: a library found there is loaded into this process."""
  folder = Path(tempfile.gettempdir()) / f"pkm_jax-{os.getuid()}"
  folder.mkdir(mode=0o700, exist_ok=True)
  info = folder.lstat()
  if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
    raise OSError(f"{folder} is not a private folder of this user")
  return folder


def _cache_folder() -> Path:
  """cache_dir(), or, where it cannot be made (a read-only home on some clusters and CI
  sandboxes), the private temporary folder."""
  try:
    cache_dir().mkdir(parents=True, exist_ok=True)
  except OSError:
    return _private_temp_dir()
  return cache_dir() if os.access(cache_dir(), os.W_OK) else _private_temp_dir()


def build() -> Path:
  """The compiled library, built if this source, jaxlib, machine, compiler and command have
  none yet (raises OSError / subprocess.CalledProcessError when it cannot be built)."""
  command = compile_command(Path("lib.so"))
  if shutil.which(command[0]) is None:
    raise OSError(f"no C++ compiler {command[0]!r} on PATH")
  version = subprocess.run([command[0], "--version"], capture_output=True, text=True).stdout
  key = hashlib.sha256()
  for part in (SOURCE.read_text(), jaxlib.__version__, platform.machine(), version,
               " ".join(command)):
    key.update(part.encode())
  folder = _cache_folder()
  path = folder / f"top_k-{key.hexdigest()[:16]}.so"
  if path.is_file():
    return path
  # Built beside its final name and renamed: concurrent first uses (test workers, hosts sharing
  # a home) each see either no library or a whole one.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
  os.close(fd)
  try:
    subprocess.run(compile_command(Path(tmp)), check=True, capture_output=True, text=True)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


@functools.cache
def available() -> bool:
  """Whether the custom call is built and registered for CPUs (once per process)."""
  if os.environ.get("PKM_JAX_CPU_TOP_K", "1") == "0":
    return False
  try:
    library = ctypes.cdll.LoadLibrary(str(build()))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.PkmTopKF32), platform="cpu")
  except Exception as e:  # noqa: BLE001 -- any failure to build, load or register: jax.lax.top_k
    detail = (getattr(e, "stderr", "") or str(e) or repr(e)).strip().splitlines()
    warnings.warn(f"pkm_jax.cpu_top_k: the CPU top-k could not be built or loaded, using "
                  f"jax.lax.top_k ({detail[-1] if detail else repr(e)})", RuntimeWarning,
                  stacklevel=2)
    return False
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
