"""Files on local disk or in a bucket: `gs://bucket/run` (or any etils.epath URL) wherever a
workdir, a checkpoint or data folder is named.

Local paths go through `os` and `open` exactly as before (no epath cost on the common path);
a path with a scheme (`gs://`, `s3://`, ...) goes through etils.epath, whose gs:// backend is
gcsfs (fsspec). orbax and tensorstore take such paths themselves. A bucket has no directories
and no rename: an object appears whole when its upload finishes, so remote writes go straight
to their name (no temporary file), folders exist when something is in them, and a folder is
"written under a temporary name and renamed" by uploading a finished local one (`upload_dir`).

Emulators: gcsfs and google-cloud-storage read STORAGE_EMULATOR_HOST, tensorstore (orbax's
gs:// driver) reads TENSORSTORE_GCS_HTTP_URL (and GOOGLE_AUTH_TOKEN_FOR_TESTING for a token);
tests/test_gcs.py sets all three.
"""

from __future__ import annotations

import os
import shutil
from typing import IO, Any, Iterator

import fsspec
from etils import epath

# Several processes and hosts (and tensorstore, beside gcsfs) write one workdir: gcsfs's cache
# of listings would answer from a stale listing (a checkpoint another process committed unseen).
for _protocol in ("gs", "gcs"):
  fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)


def is_remote(path: str | os.PathLike) -> bool:
  """True for a URL (`gs://...`): anything with a scheme."""
  return "://" in os.fspath(path)


def check_bucket(path: str) -> None:
  """For a URL, that its bucket exists: one line naming it, before a run writes anything."""
  if is_remote(path):
    scheme, rest = os.fspath(path).split("://", 1)
    bucket = f"{scheme}://{rest.split('/', 1)[0]}"
    if not epath.Path(bucket).exists():
      raise FileNotFoundError(f"bucket {bucket} (of {path}) does not exist or these credentials "
                              "cannot see it")


def absolute(path: str) -> str:
  """os.path.abspath for local paths; a URL is already absolute."""
  return path if is_remote(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
  # posixpath keeps 'gs://b/x' intact ('gs://b/x/y'); Windows is not a target.
  return os.path.join(path, *parts)


def exists(path: str) -> bool:
  return epath.Path(path).exists() if is_remote(path) else os.path.exists(path)


def isfile(path: str) -> bool:
  return epath.Path(path).is_file() if is_remote(path) else os.path.isfile(path)


def isdir(path: str) -> bool:
  """A local directory; in a bucket, a prefix that holds at least one object."""
  return epath.Path(path).is_dir() if is_remote(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
  if is_remote(path):
    return [p.name for p in epath.Path(path).iterdir()]
  return os.listdir(path)


def getsize(path: str) -> int:
  return epath.Path(path).stat().length if is_remote(path) else os.path.getsize(path)


def makedirs(path: str) -> None:
  """os.makedirs(exist_ok=True); nothing to make in a bucket (objects carry their prefix)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def open_file(path: str, mode: str = "r", encoding: str | None = None) -> IO[Any]:
  if is_remote(path):
    return epath.Path(path).open(mode, encoding=encoding) if "b" not in mode else (
        epath.Path(path).open(mode))
  return open(path, mode, encoding=encoding)


def read_bytes(path: str) -> bytes:
  with open_file(path, "rb") as f:
    return f.read()


def write_atomic(path: str, data: str | bytes, *, fsync: bool = False) -> None:
  """`path` holds `data` whole or keeps what it had: locally a temporary file renamed over it
  (`fsync` first, when asked); in a bucket one upload (an object appears when it completes)."""
  raw = data.encode() if isinstance(data, str) else data
  if is_remote(path):
    epath.Path(path).write_bytes(raw)
    return
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(raw)
    if fsync:
      f.flush()
      os.fsync(f.fileno())
  os.replace(tmp, path)


def walk_files(folder: str) -> Iterator[str]:
  """Every file under `folder`, relative and '/'-separated (unordered)."""
  if not is_remote(folder):
    for root, _, names in os.walk(folder):
      for name in names:
        yield os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
    return
  # fsspec's walk names its folders without the scheme ('bucket/run/...').
  top = _without_scheme(folder)
  for root, _, names in epath.Path(folder).walk():
    for name in names:
      yield os.path.relpath(os.path.join(_without_scheme(os.fspath(root)), name), top)


def _without_scheme(path: str) -> str:
  return path.split("://", 1)[-1].rstrip("/")


def rmtree(path: str) -> None:
  if is_remote(path):
    if epath.Path(path).exists():
      epath.Path(path).rmtree()
  else:
    shutil.rmtree(path, ignore_errors=True)


def download(src: str, dst: str) -> None:
  """Copies one (remote or local) file to a local path."""
  if is_remote(src):
    epath.Path(src).copy(epath.Path(dst), overwrite=True)
  else:
    shutil.copyfile(src, dst)


def upload_dir(local: str, out: str, *, last: tuple[str, ...] = ()) -> None:
  """Copies the local folder `local` to the remote folder `out` (whose old objects are deleted
  first), the relative paths in `last` after every other file: a reader that looks for those
  (a manifest, metadata.json) never finds them beside a partial upload."""
  rmtree(out)
  rels = sorted(walk_files(local), key=lambda rel: (rel in last, last.index(rel) if rel in last
                                                    else 0, rel))
  for rel in rels:
    epath.Path(os.path.join(local, rel)).copy(epath.Path(join(out, rel)), overwrite=True)
