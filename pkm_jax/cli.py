"""Shared command-line plumbing: flags parsed with one-line errors, library errors -> exit 1."""

from __future__ import annotations

import logging as std_logging
import os
import re
import sys
from typing import Any, Callable

from absl import app, flags, logging
from ml_collections import config_flags

from pkm_jax import config as config_lib
from pkm_jax import host_memory

# Errors a user can cause with bad input; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, FloatingPointError, OSError)


def one_line(e: BaseException) -> str:
  text = str(e.args[0]) if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
  # KeyErrors arrive repr()-quoted, with escaped newlines and quotes inside.
  text = text.replace("\\n", "\n").replace("\\'", "'")
  text = text.strip()
  if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # a KeyError's repr quotes
    text = text[1:-1]
  text = re.sub(r"\s*\n\s*", " ", text)
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


_DEFAULT_CONFIG = [""]  # define_config's default file, for _parse's error message


def _parse(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    # config_flags reports an unknown --config.x.y as a multi-line AttributeError traceback.
    sys.exit(f"error: {_unknown_override(_DEFAULT_CONFIG[0]) or 'bad flags: ' + one_line(e)}")


def define_config(default_path: str) -> config_flags._ConfigFlag | Any:
  """--config FILE with --config.x.y overrides, locked: an unknown key is an error.

  config_flags applies overrides while the flag is defined, so a bad one fails here, at import.
  """
  _DEFAULT_CONFIG[0] = default_path
  for arg in sys.argv[1:]:
    for old, new in config_lib.RENAMED_KEYS.items():
      if arg.startswith(f"--config.{old}="):
        sys.exit(f"error: --config.{old} is now --config.{new} ({old.split('.')[-1]!r} is a "
                 "Python keyword, which the flag parser cannot take)")
  try:
    return config_flags.DEFINE_config_file("config", default_path,
                                           "Config file defining get_config().", lock_config=True)
  except Exception as e:  # pylint: disable=broad-except
    sys.exit(f"error: {_unknown_override(default_path) or 'bad --config override: ' + one_line(e)}")


def _unknown_override(default_path: str) -> str | None:
  """The first --config.x.y=... override on the command line that names no key of the config
  (loaded again here: the flag's own error says only the last name, e.g. 'data_dir')."""
  argv = sys.argv[1:]
  path = default_path
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
  try:
    cfg = config_flags.config_flags.ConfigFileFlagParser("config", lock_config=False).parse(path)
    keys = [arg.split("=", 1)[0].split("config.", 1)[1] for arg in argv
            if arg.startswith(("--config.", "--noconfig."))]
    return next(filter(None, (config_lib.unknown_key(cfg, key) for key in keys)), None)
  except Exception:  # pylint: disable=broad-except  # an unloadable file: the flag's error says why
    return None


def config_overrides() -> dict[str, Any]:
  """The --config.x.y=value overrides given on the command line: {'x.y': value}."""
  f = flags.FLAGS
  return {name[len("config."):]: f[name].value for name in f
          if name.startswith("config.") and f[name].present}


def config_name() -> str:
  """The --config file's name without extension ('default' for configs/default.py)."""
  return os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]


def _quiet_orbax(record) -> bool:
  # orbax logs every file it writes (INFO) and that read-only managers are read-only (WARNING).
  return record.levelno >= std_logging.ERROR or "orbax" not in record.pathname


def run(main: Callable[[list[str]], None]) -> None:
  """absl's app.run, but bad flags and user errors end with one line and exit status 1 (Ctrl-C:
  one line, 130); first, with PKM_JAX_HUGE_PAGES=1, the command re-executes itself with huge
  pages for XLA's host buffers if that helps (`host_memory`: up to 1.2x faster steps on CPU)."""
  host_memory.reexec_with_huge_pages()

  def guarded(argv):
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
      logging.get_absl_handler().addFilter(_quiet_orbax)
    try:
      main(argv)
    except USER_ERRORS as e:
      sys.exit(f"error: {one_line(e)}")
    except KeyboardInterrupt:
      # The run's `finally` blocks have run by now: an async checkpoint save finished (or its
      # temporary folder, which never counts as a step, was left), the TensorBoard writer and
      # the data workers closed.
      print("interrupted: the checkpoints saved so far are kept (the same command resumes "
            "from the latest)", file=sys.stderr)
      sys.exit(130)

  app.run(guarded, flags_parser=_parse)
