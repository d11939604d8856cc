"""This package's XLA FFI custom calls for CPUs (`csrc/`): built on first use, registered once.

  - `csrc/top_k.cc`: the search's exact top-k (`cpu_top_k`);
  - `csrc/lookup.cc`: the weighted lookup's weights' gradient and its table's, and the forward
    sum over a quantised (int8 / fp8) table (`cpu_lookup`);
  - `csrc/sparse_rows.cc`: the gradients of picked table rows and lazy Adam on them, in place
    (`cpu_sparse_rows`, used by `sparse_adam`).
Each op has its pure-JAX reference, which GPUs and TPUs run (`jax.lax.platform_dependent`
picks by the platform lowered for), and against which the tests compare the kernels.

Only where jax's default backend is the CPU: on a GPU or TPU host nothing is compiled, loaded or
registered (the computation runs there, so the references run everywhere; code placed on such a
host's CPU devices runs them too). The library is compiled on first use with the system's C++
compiler (`$CXX`, else `c++`; at most 300 s) against jaxlib's FFI headers (~10 s), into
`$PKM_JAX_CACHE_DIR` (default `~/.cache/pkm_jax`; where that cannot be made, a private per-user
folder under the system's temporary one), named by a hash of the sources, jaxlib's version, the
machine, the C library, the compiler and the command. A cache folder or library that this user
does not own, or that others can write to, is refused (a library found there would run in this
process). Without a compiler, on such a refusal, or with `PKM_JAX_CPU_KERNELS=0`, every op runs
its pure-JAX reference (with one warning when the build or a check failed). A computation exported with `jax.export` for CPU carries the custom calls, which
jax.export refuses by default: export with `PKM_JAX_CPU_KERNELS=0` (GPU/TPU exports never see
them).
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

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "top_k.cc", CSRC / "lookup.cc", CSRC / "sparse_rows.cc")  # compiled into one library
HEADERS = (CSRC / "parallel.h",)
# Registered name -> the handler symbol the library exports.
TARGETS = {"pkm_jax_top_k_f32": "PkmTopKF32",
           "pkm_jax_gather_dot_f32": "PkmGatherDotF32",
           "pkm_jax_scatter_sum_f32": "PkmScatterSumF32",
           "pkm_jax_gather_sum_s8": "PkmGatherSumS8",
           "pkm_jax_gather_sum_f8e4m3fn": "PkmGatherSumF8E4M3FN",
           "pkm_jax_row_gradients_f32": "PkmRowGradientsF32",
           "pkm_jax_lazy_adam_f32": "PkmLazyAdamF32"}


def cache_dir() -> Path:
  default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pkm_jax"
  return Path(os.environ.get("PKM_JAX_CACHE_DIR", default))


def compile_command(out: Path) -> list[str]:
  # -ffp-contract=off: no fused multiply-adds, so each expression rounds as XLA's does.
  # -fno-math-errno: sqrt may be vectorised (it never sees a negative number here).
  return [*shlex.split(os.environ.get("CXX", "c++")), "-O3", "-std=c++17", "-shared", "-fPIC",
          "-ffp-contract=off", "-fno-math-errno", "-w", f"-I{jax.ffi.include_dir()}",
          *map(str, SOURCES), "-o", str(out)]


_COMPILE_TIMEOUT_S = 300


def _check_private(path: Path) -> None:
  """OSError unless `path` is owned by this user and writable by no one else."""
  info = path.lstat()
  if info.st_uid != os.getuid() or info.st_mode & 0o022 or stat.S_ISLNK(info.st_mode):
    raise OSError(f"{path} is not owned by this user or can be written by others: not using it "
                  f"(set PKM_JAX_CACHE_DIR to a private folder)")


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
    cache_dir().mkdir(mode=0o700, parents=True, exist_ok=True)
  except OSError:
    return _private_temp_dir()
  if not os.access(cache_dir(), os.W_OK):
    return _private_temp_dir()
  _check_private(cache_dir())
  return cache_dir()


def build() -> Path:
  """The compiled library, built if these sources, jaxlib, machine, compiler and command have
  none yet (raises OSError / subprocess.CalledProcessError when it cannot be built)."""
  command = compile_command(Path("lib.so"))
  if shutil.which(command[0]) is None:
    raise OSError(f"no C++ compiler {command[0]!r} on PATH")
  version = subprocess.run([command[0], "--version"], capture_output=True, text=True,
                           timeout=60).stdout
  key = hashlib.sha256()
  # The C library too: one built against a newer glibc on one host of a shared home fails to
  # load on the others.
  for part in (*(f.read_text() for f in SOURCES + HEADERS), jaxlib.__version__,
               platform.machine(), " ".join(platform.libc_ver()), version, " ".join(command)):
    key.update(part.encode())
  folder = _cache_folder()
  path = folder / f"kernels-{key.hexdigest()[:16]}.so"
  if path.is_file():
    _check_private(path)
    return path
  # Built beside its final name and renamed: concurrent first uses (test workers, hosts sharing
  # a home) each see either no library or a whole one.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
  os.close(fd)
  try:
    subprocess.run(compile_command(Path(tmp)), check=True, capture_output=True, text=True,
                   timeout=_COMPILE_TIMEOUT_S)
    os.chmod(tmp, 0o755)  # the linker's mode follows the umask (0775 under umask 002)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def available() -> bool:
  """Whether the custom calls are built and registered for CPUs: never where jax's default
  backend is not the CPU (nothing is then built or loaded); else built once per process."""
  if os.environ.get("PKM_JAX_CPU_KERNELS", "1") == "0" or jax.default_backend() != "cpu":
    return False
  return _load()


@functools.cache
def _load() -> bool:
  try:
    library = ctypes.cdll.LoadLibrary(str(build()))
    for target, symbol in TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                  platform="cpu")
  except Exception as e:  # noqa: BLE001 -- any failure to build, load or register: pure JAX
    detail = (getattr(e, "stderr", "") or str(e) or repr(e)).strip().splitlines()
    warnings.warn(f"pkm_jax.cpu_kernels: the CPU kernels could not be built or loaded, using "
                  f"their pure-JAX versions ({detail[-1] if detail else repr(e)})",
                  RuntimeWarning, stacklevel=2)
    return False
  return True


def varying_type(shape: tuple[int, ...], dtype, *like: jax.Array):
  """The type of a kernel result: inside a shard_map it varies over every mesh axis one of
  `like` varies over (as the pure-JAX op's result would)."""
  varying = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in like))
  first = jax.typeof(like[0])
  return first.update(shape=shape, dtype=jnp.dtype(dtype), weak_type=False,
                      manual_axis_type=first.manual_axis_type.update(varying=varying))
