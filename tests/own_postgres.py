"""A PostgreSQL cluster of a test's own (initdb on another port), for faults that stop the server: restarting or
stopping the machine's shared one would disturb every other test."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_VERSIONS = sorted(os.listdir("/usr/lib/postgresql")) if Path("/usr/lib/postgresql").is_dir() else []
PG_BIN = Path("/usr/lib/postgresql") / (_VERSIONS[-1] if _VERSIONS else "") / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def available() -> bool:
    """Whether this machine can start a cluster of its own (PostgreSQL's server binaries, and runuser as root)."""
    return (PG_BIN / "initdb").exists() and shutil.which("runuser") is not None


@dataclass
class OwnPostgres:
    """A PostgreSQL cluster this module starts, stops and restarts at will."""

    data: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/retro"

    def ctl(self, *args: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", *args],
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        self.ctl("-l", str(self.data / "server.log"), "-o", f"-p {self.port} -k {self.data} -h 127.0.0.1", "start")

    def stop(self) -> None:
        self.ctl("-m", "fast", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()


@contextlib.contextmanager
def own_postgres() -> Iterator[OwnPostgres]:
    """A new cluster with a database `retro`, started; stopped and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="retro-own-pg-"))
    shutil.chown(root, "postgres")
    pg = OwnPostgres(data=root / "data", port=free_port())
    try:
        subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                str(PG_BIN / "initdb"),
                "-D",
                str(pg.data),
                "-A",
                "trust",
                "-U",
                "postgres",
            ],
            check=True,
            capture_output=True,
        )
        pg.start()
        subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                str(PG_BIN / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(pg.port),
                "retro",
            ],
            check=True,
        )
        yield pg
    finally:
        with contextlib.suppress(subprocess.CalledProcessError, FileNotFoundError):
            pg.ctl("-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)
