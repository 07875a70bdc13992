"""Shared behaviour of the absl command-line entry points: user errors become one line, exit 2."""

from __future__ import annotations

import ast
import logging
import os
import sys
from typing import Callable

from absl import app, flags
from absl import logging as absl_logging

from llada_jax.errors import LladaError

# Libraries whose INFO lines would drown the training log (warnings still show).
QUIET_LIBRARIES = ("/orbax/", "/seqio/", "/tensorflow/", "/jax/")


class _QuietLibraries(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(
        part in record.pathname for part in QUIET_LIBRARIES
    )


def run_reporting_errors(fn: Callable[[], None]) -> None:
  """Runs fn; a LladaError prints `error: <message>` on stderr and exits with status 2."""
  absl_logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    fn()
  except LladaError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _unknown_key_message(error: Exception) -> str:
  """One line for ml_collections' unknown-key error, whose text arrives quoted (once or twice)
  with its "Did you mean" hint on a second line."""
  text = str(error.args[0] if error.args else error)
  while len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
    try:
      text = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      break
  key, *rest = text.splitlines() or [""]
  hint = f" ({rest[0][0].lower()}{rest[0][1:]})" if rest and rest[0] else ""
  return f"unknown config key {key.strip(chr(39))!r} in a --config.* override{hint}"


def parse_flags_or_exit(argv: list[str]) -> list[str]:
  """absl flag parsing whose errors (unknown flag, unknown config key, bad value) are one line."""
  for arg in argv[1:]:
    # --config=FILE:ARG passes ARG to FILE's get_config (ml_collections config_flags).
    if arg.startswith("--config=") and not os.path.isfile(arg.split("=", 1)[1].split(":", 1)[0]):
      print(
          f"error: {arg} names no file; pass a config such as --config=configs/tiny.py",
          file=sys.stderr,
      )
      sys.exit(2)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e).strip().splitlines()[-1].strip()
  except (AttributeError, KeyError) as e:  # ml_collections: --config.<path> names no field
    message = _unknown_key_message(e)
  except (TypeError, ValueError) as e:  # ml_collections: a value of the wrong type
    message = f"bad --config.* override: {e}"
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def entry_point(body: Callable[[list[str]], None]) -> Callable[[], None]:
  """The console-script function of an absl program whose work is body(argv)."""

  def main(argv: list[str]) -> None:
    run_reporting_errors(lambda: body(argv))

  def run() -> None:
    app.run(main, flags_parser=parse_flags_or_exit)

  return run
