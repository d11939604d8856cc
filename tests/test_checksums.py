"""checksums.sha256 manifests: written whole, checked file by file, any one-bit change refused.

The reference is GNU `sha256sum -c` on the same manifest and hashlib on the files' bytes.
"""

import hashlib
import os
import random
import shutil
import subprocess

import pytest

from pkm_jax import checksums


def make_folder(root) -> str:
  folder = os.path.join(str(root), "f")
  os.makedirs(os.path.join(folder, "params", "d"))
  rng = random.Random(0)
  files = {"meta.json": b'{"a": 1}\n', "params/d/0a1b": rng.randbytes(70_000),
           "params/d/ff": rng.randbytes(3), "empty": b""}
  for rel, data in files.items():
    with open(os.path.join(folder, rel), "wb") as f:
      f.write(data)
  return folder


def flip_bit(path: str, bit: int) -> None:
  with open(path, "r+b") as f:
    f.seek(bit // 8)
    byte = f.read(1)[0]
    f.seek(bit // 8)
    f.write(bytes([byte ^ (1 << (bit % 8))]))


def test_manifest_matches_hashlib_and_sha256sum(tmp_path):
  folder = make_folder(tmp_path)
  digests = checksums.write(folder)
  assert sorted(digests) == ["empty", "meta.json", "params/d/0a1b", "params/d/ff"]
  for rel, digest in digests.items():
    with open(os.path.join(folder, rel), "rb") as f:
      assert digest == hashlib.sha256(f.read()).hexdigest()
  assert checksums.read(folder) == digests
  assert checksums.verify(folder)
  if shutil.which("sha256sum"):  # the manifest is sha256sum's format: it checks it too
    proc = subprocess.run(["sha256sum", "-c", "--strict", checksums.MANIFEST], cwd=folder,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    flip_bit(os.path.join(folder, "params/d/ff"), 3)
    proc = subprocess.run(["sha256sum", "-c", checksums.MANIFEST], cwd=folder,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "params/d/ff: FAILED" in proc.stdout


def test_every_one_bit_change_of_every_file_is_refused(tmp_path):
  folder = make_folder(tmp_path)
  checksums.write(folder)
  rng = random.Random(1)
  for rel in ["meta.json", "params/d/0a1b", "params/d/ff", checksums.MANIFEST]:
    path = os.path.join(folder, rel)
    bits = 8 * os.path.getsize(path)
    # Every bit of the small files (the manifest included), 64 random ones of the large one.
    for bit in (range(bits) if bits <= 8 * 4096 else rng.sample(range(bits), 64)):
      flip_bit(path, bit)
      with pytest.raises(checksums.ChecksumError) as e:
        checksums.verify(folder)
      assert e.value.path == rel
      flip_bit(path, bit)
    assert checksums.verify(folder)


def test_truncated_missing_and_unlisted_files(tmp_path):
  folder = make_folder(tmp_path)
  checksums.write(folder)
  path = os.path.join(folder, "params/d/0a1b")
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:-1])
  with pytest.raises(checksums.ChecksumError, match="0a1b does not match its checksum"):
    checksums.verify(folder)
  # A filter skips what a reader does not read.
  assert checksums.verify(folder, include=lambda rel: not rel.startswith("params/"))
  os.remove(path)
  with pytest.raises(checksums.ChecksumError, match="0a1b is missing"):
    checksums.verify(folder)
  with pytest.raises(checksums.ChecksumError, match="is not in"):
    checksums.verify_file(folder, "new", checksums.read(folder))
  os.remove(os.path.join(folder, checksums.MANIFEST))
  assert checksums.read(folder) is None and checksums.verify(folder) is False


def test_write_excludes_then_complete_adds(tmp_path):
  folder = make_folder(tmp_path)
  assert "meta.json" not in checksums.write(folder, exclude=("meta.json",))
  with open(os.path.join(folder, "late"), "wb") as f:
    f.write(b"written after the manifest")
  digests = checksums.complete(folder)
  assert {"meta.json", "late"} <= set(digests) and checksums.verify(folder)
  assert not [n for n in os.listdir(folder) if n.startswith(checksums.MANIFEST + ".")]
