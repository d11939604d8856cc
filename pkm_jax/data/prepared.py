"""The prepared-data folder: packed rows in sharded ArrayRecord files, plus metadata.json.

Written once by `python -m pkm_jax.data.prepare` (prepare.py), read by training and evaluation
(`data.source=prepared`, `data.path=DIR`; `data.eval_path=DIR`). Layout:

  DIR/metadata.json                what is in the folder (below); written last
  DIR/tokenizer.json               the tokenizer the rows were made with
  DIR/<split>-NNNNN.array_record   packed rows of split 'train' or 'eval', in stream order
  DIR/checksums.sha256             every file's SHA-256 (`checksums`): the metadata and the
                                   tokenizer are checked when the folder is opened, a shard
                                   when a process first reads from it (riegeli's own chunk
                                   hashes check each record as it is read, too)

A record holds up to ROWS_PER_RECORD consecutive rows as one [k, max_len] array of `dtype`
(uint16 when the vocabulary fits, else uint32): ArrayRecord keeps a ~14-byte index entry per
record in memory for every open file, so records of 16 rows keep a reader's memory ~1 byte per
row (a 16 GB corpus: ~30 MB) while a random row still costs one small read. Files are written
with group_size:1, so any record is read without its neighbours.

A folder in a bucket (`data.path=gs://...`): ArrayRecord reads local files only, so the folder
is copied to local disk once per host (`fetch`, a progress bar; PKM_JAX_DATA_CACHE, default
~/.cache/pkm_jax/prepared), each file checked against the folder's checksums before it is
renamed into the copy, which is then read as a local folder. The copy is named by the bucket
path and the manifest's content: a folder prepared again is copied again, an unchanged one is
reused by every later run on that host; the processes of one host take turns (a file lock), so
only the first copies.

metadata.json: format, version, max_len, vocab_size, dtype, rows_per_record, rows_per_shard,
layout ('mlm' or 'causal': the kind of rows), tokenizer (fingerprint), special_ids, source
(what was read and how documents were held out) and, per split, rows, documents, tokens, input
bytes and its shards (file, rows, bytes).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from tqdm import tqdm

from pkm_jax import checksums
from pkm_jax import storage

FORMAT, VERSION = "pkm-jax-prepared", 1
METADATA_FILE, TOKENIZER_FILE = "metadata.json", "tokenizer.json"
ROWS_PER_RECORD = 16
SPLITS = ("train", "eval")
# metadata "layout": what the rows are. MLM: `[CLS] ... [SEP]` rows (packing.py; also a folder
# without the key, from before causal rows); CAUSAL: EOS-separated documents (causal.py).
MLM, CAUSAL = "mlm", "causal"
_WRITER_OPTIONS = "group_size:1,uncompressed"  # token ids barely compress; random access needs 1
_READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"  # random reads: no read-ahead


def shard_name(split: str, index: int) -> str:
  return f"{split}-{index:05d}.array_record"


def token_dtype(vocab_size: int) -> str:
  return "uint16" if vocab_size <= 1 << 16 else "uint32"


class ShardWriter:
  """Appends [n, max_len] rows to `split`'s shard files in `folder`; `close()` lists them."""

  def __init__(self, folder: str, split: str, *, max_len: int, dtype: str, rows_per_shard: int):
    if rows_per_shard < ROWS_PER_RECORD or rows_per_shard % ROWS_PER_RECORD:
      raise ValueError(f"rows_per_shard={rows_per_shard} must be a positive multiple of "
                       f"{ROWS_PER_RECORD}")
    self.folder, self.split, self.max_len = folder, split, max_len
    self.dtype, self.rows_per_shard = np.dtype(dtype), rows_per_shard
    self.shards: list[dict[str, Any]] = []
    self.rows = 0
    self._writer: ArrayRecordWriter | None = None
    self._in_shard = 0
    self._pending = np.zeros((0, max_len), self.dtype)  # < ROWS_PER_RECORD rows not yet written

  def write(self, rows_NxT: np.ndarray) -> None:
    if rows_NxT.shape[1:] != (self.max_len,):
      raise ValueError(f"rows of shape {rows_NxT.shape} are not [n, {self.max_len}]")
    if len(rows_NxT) and rows_NxT.max() > np.iinfo(self.dtype).max:
      raise ValueError(f"token id {rows_NxT.max()} does not fit {self.dtype}")
    rows = np.concatenate([self._pending, rows_NxT.astype(self.dtype)])
    full = len(rows) // ROWS_PER_RECORD * ROWS_PER_RECORD
    for start in range(0, full, ROWS_PER_RECORD):
      self._write_record(rows[start:start + ROWS_PER_RECORD])
    self._pending = rows[full:]

  def _write_record(self, rows: np.ndarray) -> None:
    if self._writer is None:
      self._writer = ArrayRecordWriter(
          os.path.join(self.folder, shard_name(self.split, len(self.shards))), _WRITER_OPTIONS)
      self._in_shard = 0
    self._writer.write(np.ascontiguousarray(rows).tobytes())
    self._in_shard += len(rows)
    self.rows += len(rows)
    if self._in_shard >= self.rows_per_shard:
      self._close_shard()

  def _close_shard(self) -> None:
    self._writer.close()
    name = shard_name(self.split, len(self.shards))
    self.shards.append({"file": name, "rows": self._in_shard,
                        "bytes": os.path.getsize(os.path.join(self.folder, name))})
    self._writer = None

  def close(self) -> list[dict[str, Any]]:
    if len(self._pending):
      self._write_record(self._pending)
      self._pending = self._pending[:0]
    if self._writer is not None:
      self._close_shard()
    return self.shards


CACHE_ENV = "PKM_JAX_DATA_CACHE"
_fetched: dict[str, str] = {}  # bucket folder -> its local copy, in this process


def cache_root() -> str:
  return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "pkm_jax",
                                                   "prepared")


def fetch(folder: str, what: str = "data.path", *, progress: bool = True) -> str:
  """The local folder to read: `folder` itself, or for a bucket folder its local copy (made on
  the first call on this host, each file checked against the manifest; see the module doc)."""
  if not storage.is_remote(folder):
    return folder
  if folder in _fetched:
    return _fetched[folder]
  if not storage.isfile(os.path.join(folder, METADATA_FILE)):
    raise FileNotFoundError(f"{what}={folder} is not a prepared folder: no {METADATA_FILE} (an "
                            "interrupted preparation or upload leaves none; run python -m "
                            "pkm_jax.data.prepare again)")
  manifest = os.path.join(folder, checksums.MANIFEST)
  if not storage.isfile(manifest):
    raise FileNotFoundError(f"{what}={folder} has no {checksums.MANIFEST}: a prepared folder in a "
                            "bucket is copied to local disk only when its copy can be checked; "
                            "prepare it again")
  listed = storage.read_bytes(manifest)
  key = hashlib.sha256(folder.encode() + b"\0" + listed).hexdigest()[:16]
  local = os.path.join(cache_root(), key)
  os.makedirs(local, exist_ok=True)
  with open(os.path.join(cache_root(), f"{key}.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed
    if not os.path.isfile(os.path.join(local, checksums.MANIFEST)):  # else the same (its key)
      storage.write_atomic(os.path.join(local, checksums.MANIFEST), listed)
    try:
      digests = checksums.read(local)
    except checksums.ChecksumError as e:
      raise ValueError(f"prepared folder {folder} is corrupt: {e}; prepare it again") from e
    # A file is renamed into the copy only once it matched: what is there is checked.
    todo = [rel for rel in sorted(digests) if not os.path.isfile(os.path.join(local, rel))]
    sizes = {rel: storage.getsize(os.path.join(folder, rel)) for rel in todo}
    with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, dynamic_ncols=True,
              desc=f"copying {folder}", disable=not (progress and todo)) as bar:
      for rel in todo:
        _copy_checked(folder, local, rel, digests, bar)
  _fetched[folder] = local
  return local


def _copy_checked(folder: str, local: str, rel: str, digests: dict[str, str], bar: tqdm) -> None:
  src, dst = os.path.join(folder, rel), os.path.join(local, rel)
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  tmp = f"{dst}.tmp-{os.getpid()}"
  try:
    with storage.open_file(src, "rb") as f_in, open(tmp, "wb") as f_out:
      while chunk := f_in.read(1 << 24):
        f_out.write(chunk)
        bar.update(len(chunk))
    if checksums.file_sha256(tmp) != digests[rel]:
      raise ValueError(f"prepared file {src} does not match its checksum (changed, truncated "
                       "or damaged): prepare the folder again")
    os.replace(tmp, dst)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def read_metadata(folder: str, what: str = "data.path") -> dict[str, Any]:
  """metadata.json of a prepared folder, checked: format, version and every shard's size. A
  bucket folder is first copied to local disk (`fetch`)."""
  folder = fetch(folder, what)
  path = os.path.join(folder, METADATA_FILE)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{what}={folder} does not exist (make it with python -m "
                            "pkm_jax.data.prepare)")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what}={folder} is not a prepared folder: no {METADATA_FILE} (an "
                            "interrupted preparation leaves none; run python -m "
                            "pkm_jax.data.prepare again)")
  _verify(folder, lambda rel: rel in (METADATA_FILE, TOKENIZER_FILE))
  try:
    with open(path, encoding="utf-8") as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} cannot be parsed: {e}") from e
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise ValueError(f"{path} is not pkm-jax prepared-data metadata")
  if meta.get("version") != VERSION:
    raise ValueError(f"{path} has format version {meta.get('version')}; this pkm-jax reads "
                     f"version {VERSION}: prepare the data again")
  for split, info in meta["splits"].items():
    for shard in info["shards"]:
      file = os.path.join(folder, shard["file"])
      if not os.path.isfile(file):
        raise FileNotFoundError(f"prepared shard {file} is missing ({split} split of {folder})")
      size = os.path.getsize(file)
      if size != shard["bytes"]:
        raise ValueError(f"prepared shard {file} has {size} bytes but {METADATA_FILE} says "
                         f"{shard['bytes']}: it is truncated or was replaced")
  return meta


def _verify(folder: str, include) -> None:
  try:
    if not checksums.verify(folder, include):
      checksums.warn_unverified(folder, "prepared")
  except checksums.ChecksumError as e:
    raise ValueError(f"prepared folder {folder} is corrupt: {e}; prepare it again") from e


class PreparedRows:
  """Random access to the rows of one split: `len()`, `read(rows [n]) -> [n, max_len] int32`.

  Opening is O(1) in the corpus size: the metadata says how many rows each shard holds, and a
  shard's file is only opened when a row of it is first read (then its record count is
  checked). Thread-safe; picklable (grain worker processes reopen the files they read).
  """

  def __init__(self, folder: str, split: str, meta: dict[str, Any] | None = None):
    folder = fetch(folder)  # a bucket folder: its local copy
    self.meta = meta if meta is not None else read_metadata(folder)
    if split not in self.meta["splits"]:
      raise ValueError(f"prepared folder {folder} has no {split!r} split (it has "
                       f"{', '.join(sorted(self.meta['splits'])) or 'none'})")
    self.folder, self.split = folder, split
    self.max_len = int(self.meta["max_len"])
    self.dtype = np.dtype(self.meta["dtype"])
    self.rows_per_record = int(self.meta["rows_per_record"])
    self.shards = self.meta["splits"][split]["shards"]
    self.shard_starts = np.cumsum([0] + [s["rows"] for s in self.shards])
    # Identifies the rows (for refusing a checkpoint's data state from other data).
    self.fingerprint = hashlib.sha256(json.dumps(
        [self.meta["tokenizer"]["fingerprint"], self.max_len, split, self.shards],
        sort_keys=True).encode()).hexdigest()[:16]
    self._digests = checksums.read(folder)  # the metadata's check read it whole already
    self._open()

  def _open(self) -> None:
    self._readers: dict[int, ArrayRecordReader] = {}
    self._lock = threading.Lock()

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    del state["_readers"], state["_lock"]
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._open()

  def __len__(self) -> int:
    return int(self.shard_starts[-1])

  def _reader(self, shard: int) -> ArrayRecordReader:
    if shard not in self._readers:
      file = os.path.join(self.folder, self.shards[shard]["file"])
      want = -(-self.shards[shard]["rows"] // self.rows_per_record)
      if self._digests is not None:  # once per shard and process: the cost of what is read
        try:
          checksums.verify_file(self.folder, self.shards[shard]["file"], self._digests)
        except checksums.ChecksumError as e:
          raise ValueError(f"prepared shard {file} is corrupt: {e}; prepare the folder "
                           "again") from e
      try:
        reader = ArrayRecordReader(file, _READER_OPTIONS, file_reader_buffer_size=512)
        have = reader.num_records()
      except Exception as e:  # the C++ reader raises RuntimeError/ValueError for bad files
        raise ValueError(f"prepared shard {file} is corrupt: {str(e).splitlines()[0]}") from e
      if have != want:
        raise ValueError(f"prepared shard {file} holds {have} records; {METADATA_FILE} says "
                         f"{want}: it is corrupt")
      self._readers[shard] = reader
    return self._readers[shard]

  def read(self, rows_N: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows_N, np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
      raise IndexError(f"rows outside [0, {len(self)}) of {self.folder} {self.split}")
    shard_N = np.searchsorted(self.shard_starts, rows, side="right") - 1
    local_N = rows - self.shard_starts[shard_N]
    out_NxT = np.empty((len(rows), self.max_len), np.int32)
    k = self.rows_per_record
    with self._lock:  # a reader's seek + read is one operation
      for i, (shard, local) in enumerate(zip(shard_N.tolist(), local_N.tolist())):
        reader = self._reader(shard)
        try:
          reader.seek(local // k)
          record = reader.read()
        except Exception as e:  # riegeli reports a bad checksum as RuntimeError
          file = os.path.join(self.folder, self.shards[shard]["file"])
          raise ValueError(f"prepared shard {file} is corrupt: {str(e).splitlines()[0]}") from e
        out_NxT[i] = np.frombuffer(record, self.dtype).reshape(-1, self.max_len)[local % k]
    return out_NxT
