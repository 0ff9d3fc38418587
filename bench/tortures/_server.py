"""A real `nestvec serve` process for the fuzz and auth parts: its own process, so a crash is an exit
code and a hang is a deadline; its stdout and stderr in a file, so what it logged can be searched."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import grpc

from bench.tortures import REPO

MAX_CLIENT_MESSAGE = 256 << 20  # the client must see the server's own limits, not its 4 MB default


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def self_signed_cert(folder: Path, name: str = "server") -> tuple[Path, Path]:
    """(cert, key) for localhost / 127.0.0.1, made by openssl (EC: much faster to make than RSA)."""
    cert, key = folder / f"{name}-cert.pem", folder / f"{name}-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


class ServerProcess:
    """`python -m nestvec.cli --data DATA serve` on 127.0.0.1, started with `start()` and awaited with
    `wait_ready()` (two servers can start at once), stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, data: Path, log: Path, *, api_keys: Sequence[str] = (), read_only_keys: Sequence[str] = (),
                 tls: tuple[Path, Path] | None = None, cwd: Path | None = None,
                 serve_args: Sequence[str] = ()) -> None:
        """`serve_args`: more `nestvec serve` flags (the disk part's --max-disk-mb)."""
        self.data, self.log, self.tls, self.cwd = data, log, tls, cwd
        self.serve_args = list(serve_args)
        self.api_keys, self.read_only_keys = list(api_keys), list(read_only_keys)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def target(self) -> str:
        return f"{'localhost' if self.tls else '127.0.0.1'}:{self.port}"

    def channel(self, *, plaintext: bool = False, root_cert: Path | None = None) -> grpc.Channel:
        """A channel to this server: TLS trusting its certificate (or `root_cert`) when it has one."""
        options = [("grpc.max_receive_message_length", MAX_CLIENT_MESSAGE),
                   ("grpc.max_send_message_length", MAX_CLIENT_MESSAGE)]
        if self.tls is None or plaintext:
            return grpc.insecure_channel(self.target, options=options)
        creds = grpc.ssl_channel_credentials((root_cert or self.tls[0]).read_bytes())
        return grpc.secure_channel(self.target, creds, options=options)

    def start(self) -> None:
        command = [sys.executable, "-X", "faulthandler", "-m", "nestvec.cli", "--data", str(self.data), "serve",
                   "--host", "127.0.0.1", "--port", str(self.port)]
        for key in self.api_keys:
            command += ["--api-key", key]
        for key in self.read_only_keys:
            command += ["--read-only-key", key]
        if self.tls:
            command += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])]
        command += self.serve_args
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self._log_file = self.log.open("ab")  # a file, not a pipe: a full pipe would stall a chatty server
        self.proc = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT, cwd=self.cwd, env=env)

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """Until the (open) health service answers SERVING; raises with the log if the server died."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout_s
        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start: {self.log_text()[-3000:]}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 20.0) -> int | None:
        """SIGTERM (the server drains in-flight calls); after `grace_s`, SIGABRT (stacks into the log),
        then SIGKILL. The exit code: 0 for a clean drain."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:  # SIGABRT first: faulthandler writes every thread's stack to the log
                self.proc.send_signal(signal.SIGABRT)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""
