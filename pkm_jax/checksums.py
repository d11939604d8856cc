"""Per-file SHA-256 manifests of the folders pkm-jax writes, checked before any file is read.

orbax and tensorstore keep no checksums of their own: a flipped bit in a checkpoint restores
silently with wrong weights, and random bytes fail inside orbax's concurrent reads, whose
siblings outlive the failure. So every checkpoint step, converted checkpoint and prepared-data
folder carries `checksums.sha256`, and its files are hashed and compared before orbax (or an
ArrayRecord reader) opens any of them.

The manifest is `sha256sum`'s format, one `<hex>  <relative path>` line per file, sorted, so
`cd FOLDER && sha256sum -c checksums.sha256` checks a folder by hand too; its last line,
`# <hex> manifest`, is the hash of the lines above it (a comment to sha256sum), so that a
change in the manifest itself is refused as well. Folders in a bucket (`gs://`, `storage`) are
hashed and checked the same way, each file read through once. SHA-256 runs at ~1.8 GB/s a core here
(OpenSSL); files are hashed on a few threads (hashlib releases the GIL).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import sys
from typing import Callable, Iterable

from pkm_jax import storage

MANIFEST = "checksums.sha256"
_SELF = " manifest"  # the last line: f"# {hex}{_SELF}"


class ChecksumError(ValueError):
  """A file of a folder does not match the folder's manifest (or the manifest is damaged).

  `path` is the file that failed, relative to the folder.
  """

  def __init__(self, message: str, path: str):
    super().__init__(message)
    self.path = path


def file_sha256(path: str) -> str:
  with storage.open_file(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _files(folder: str) -> list[str]:
  """Every file under `folder` (relative, '/'-separated, sorted), the manifest excepted."""
  return sorted(rel for rel in storage.walk_files(folder)
                if rel != MANIFEST and not rel.startswith(MANIFEST + "."))


def _hash_all(folder: str, rels: Iterable[str]) -> dict[str, str]:
  rels = list(rels)
  workers = min(4, os.cpu_count() or 1, max(1, len(rels)))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    digests = pool.map(lambda rel: file_sha256(os.path.join(folder, rel)), rels)
    return dict(zip(rels, digests))


def _text(digests: dict[str, str]) -> str:
  body = "".join(f"{digests[rel]}  {rel}\n" for rel in sorted(digests))
  return body + f"# {hashlib.sha256(body.encode()).hexdigest()}{_SELF}\n"


def write(folder: str, exclude: Iterable[str] = ()) -> dict[str, str]:
  """Hashes every file under `folder` (but the relative paths in `exclude`) into
  `folder/checksums.sha256`, written under a temporary name and renamed, so a manifest is whole
  or absent; returns {relative path: hex}."""
  exclude = set(exclude)
  return _write(folder, _hash_all(folder, [rel for rel in _files(folder) if rel not in exclude]))


def complete(folder: str) -> dict[str, str]:
  """Adds the files that are not yet in `folder`'s manifest to it (those written after it)."""
  digests = read(folder) or {}
  digests.update(_hash_all(folder, [rel for rel in _files(folder) if rel not in digests]))
  return _write(folder, digests)


def _write(folder: str, digests: dict[str, str]) -> dict[str, str]:
  storage.write_atomic(os.path.join(folder, MANIFEST), _text(digests).encode("ascii"), fsync=True)
  return digests


def read(folder: str) -> dict[str, str] | None:
  """The manifest's {relative path: hex}, or None when the folder has none (written before
  pkm-jax kept checksums). Raises ChecksumError when the manifest itself is damaged."""
  path = os.path.join(folder, MANIFEST)
  if not storage.isfile(path):
    return None
  damaged = lambda why: ChecksumError(f"{path} is damaged ({why})", MANIFEST)  # noqa: E731
  try:
    text = storage.read_bytes(path).decode("ascii")
  except UnicodeDecodeError as e:
    raise damaged("not ASCII") from e
  body, _, last = text.rstrip("\n").rpartition("\n")
  body += "\n" if body else ""
  if not (last.startswith("# ") and last.endswith(_SELF)):
    raise damaged("its last line is not its own checksum")
  if hashlib.sha256(body.encode()).hexdigest() != last[2:-len(_SELF)]:
    raise damaged("its lines do not match their checksum")
  digests = {}
  for line in body.splitlines():
    digest, sep, rel = line.partition("  ")
    if not sep or len(digest) != 64 or not rel:
      raise damaged(f"bad line {line[:80]!r}")
    digests[rel] = digest
  return digests


def verify(folder: str, include: Callable[[str], bool] | None = None) -> bool:
  """Checks the files the manifest lists (those `include(relative path)` accepts, default all)
  against it: True when all match, False when the folder has no manifest. Raises ChecksumError
  naming the first file (in path order) that is missing, changed or truncated."""
  digests = read(folder)
  if digests is None:
    return False
  wanted = [rel for rel in sorted(digests) if include is None or include(rel)]
  for rel in wanted:
    if not storage.isfile(os.path.join(folder, rel)):
      raise ChecksumError(f"{os.path.join(folder, rel)} is missing", rel)
  actual = _hash_all(folder, wanted)
  for rel in wanted:
    if actual[rel] != digests[rel]:
      raise ChecksumError(f"{os.path.join(folder, rel)} does not match its checksum (changed, "
                          f"truncated or damaged)", rel)
  return True


def verify_file(folder: str, rel: str, digests: dict[str, str]) -> None:
  """Checks one file against an already-read manifest (a file the manifest lacks fails)."""
  path = os.path.join(folder, rel)
  if rel not in digests:
    raise ChecksumError(f"{path} is not in {os.path.join(folder, MANIFEST)}", rel)
  if not storage.isfile(path):
    raise ChecksumError(f"{path} is missing", rel)
  if file_sha256(path) != digests[rel]:
    raise ChecksumError(f"{path} does not match its checksum (changed, truncated or damaged)",
                        rel)


_warned: set[str] = set()


def warn_unverified(folder: str, what: str = "written") -> None:
  """One stderr line, once per folder and process: `folder` had no manifest and was read
  unchecked (`what`: how it was made, e.g. 'prepared')."""
  if folder not in _warned:
    _warned.add(folder)
    print(f"warning: {folder} has no {MANIFEST} ({what} before pkm-jax kept checksums, or cut "
          "off before it was written): read without a check", file=sys.stderr)
