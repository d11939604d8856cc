"""A folder written under a temporary name beside its destination, then swapped in whole.

An interrupted write (an error, Ctrl-C, a full disk) never leaves a folder that looks complete,
and a replaced folder is never half old, half new: converted checkpoints and prepared data are
both written this way.

For a folder in a bucket (gs://), which has no rename, the folder is made on local disk and
uploaded when complete, over the deleted old one, with the files that mark it complete (`last`:
a manifest, metadata) uploaded after all the others: an interrupted upload leaves a folder that
readers refuse as incomplete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from pkm_jax import storage


@contextlib.contextmanager
def staged_dir(out: str, *, last: tuple[str, ...] = ()) -> Iterator[str]:
  """Yields a new empty folder beside `out`. When the block ends, it becomes `out` (an existing
  `out`, which the caller has agreed to replace, is moved aside first and then deleted); when
  the block raises, it is deleted and `out` is left as it was. A remote `out`: see above."""
  if storage.is_remote(out):
    tmp = tempfile.mkdtemp(prefix=".pkm_jax-upload-")
    try:
      yield tmp
      storage.upload_dir(tmp, out, last=last)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
    return
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
  try:
    yield tmp
    if os.path.exists(out):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
      os.rename(out, os.path.join(old, "x"))
      os.rename(tmp, out)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
