"""Paths that may be object-storage URLs: workdirs, checkpoints and the files beside them.

Every path a command writes or reads under a workdir goes through `path()`, an `etils.epath.Path`
(the path type Orbax uses), which keeps `gs://bucket/run` a URL where `pathlib.Path` would turn it
into the local folder `gs:/bucket/run`. Cloud Storage is reached through gcsfs and TensorStore,
which honour `STORAGE_EMULATOR_HOST` and `TENSORSTORE_GCS_HTTP_URL` (a local server in the tests)
and otherwise use the machine's Google credentials (`gcloud auth application-default login`, or
the VM's service account on Cloud TPU and GCE). `llada_jax/__init__.py` sets EPATH_USE_TF=false
so that epath does not route gs:// through TensorFlow, whose client takes no emulator endpoint and
which GPU images often lack; set EPATH_USE_TF=true before importing llada_jax to go back to it.

Object stores have no append and no atomic create-if-absent, which `append_jsonl` and
`workdir_lock` account for; libraries that need a local file (tokenizers, safetensors) get one
from `local_copy`.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from typing import Iterator, Sequence

from etils import epath

Path = epath.Path
PathLike = str | os.PathLike


def path(p: PathLike) -> epath.Path:
  """p as an epath.Path: a URL (gs://, s3://) stays one; a local path is made absolute."""
  result = epath.Path(p)
  return result if is_remote(result) else epath.Path(os.path.abspath(os.fspath(p)))


def is_remote(p: PathLike) -> bool:
  """Whether p is an object-storage URL (gs://, s3://, ...) rather than a local path."""
  return "://" in os.fspath(p)


def append_jsonl(target: epath.Path, lines: Sequence[str]) -> None:
  """Appends lines (each ending in a newline) to a text file. Local files are appended to; an
  object is rewritten whole (object stores cannot append), so callers batch their lines."""
  if not lines:
    return
  if not is_remote(target):
    with open(os.fspath(target), "a", encoding="utf-8") as f:
      f.writelines(lines)
    return
  old = target.read_text(encoding="utf-8") if target.exists() else ""
  target.write_text(old + "".join(lines), encoding="utf-8")


def copy_file(source: PathLike, target: PathLike) -> None:
  """Copies one file between any two paths (local or URL)."""
  source, target = path(source), path(target)
  if not is_remote(source) and not is_remote(target):
    shutil.copyfile(os.fspath(source), os.fspath(target))
  else:
    target.write_bytes(source.read_bytes())


@contextlib.contextmanager
def local_copy(p: PathLike) -> Iterator[pathlib.Path]:
  """A local path holding the file p: p itself when local, else a temporary download."""
  if not is_remote(p):
    yield pathlib.Path(os.fspath(p))
    return
  with tempfile.TemporaryDirectory(prefix="llada_") as folder:
    local = pathlib.Path(folder) / path(p).name
    local.write_bytes(path(p).read_bytes())
    yield local


def cached_local_copy(p: PathLike) -> str:
  """A local file with p's content that outlives the call (for objects that a library must open
  by name for the whole run, such as a tokenizer.json): p itself when local, else a download into
  a per-process temporary folder."""
  if not is_remote(p):
    return os.fspath(p)
  folder = pathlib.Path(tempfile.gettempdir()) / f"llada_jax_{os.getpid()}"
  folder.mkdir(exist_ok=True)
  local = folder / f"{abs(hash(os.fspath(p)))}_{path(p).name}"
  if not local.exists():
    local.write_bytes(path(p).read_bytes())
  return str(local)
