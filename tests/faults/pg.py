"""A real PostgreSQL server on a free loopback port that can be stopped and started again.

Shared by the fault tests (tests/faults) and `bench/faults.py`; needs Debian's `postgresql`
(`make test-services` installs it).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from proxyloop.testing import free_port


def pg_bin(name: str) -> str:
    """Path of a PostgreSQL server binary (initdb, pg_ctl): on PATH or under Debian's versioned directory."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise RuntimeError(f"PostgreSQL's {name} not found; install Debian's `postgresql` (`make test-services`)")
    return found


@dataclass(frozen=True)
class PostgresServer:
    """One cluster in `data`; `url` is an admin URL (psycopg) to the `postgres` database."""

    data: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://proxyloop@127.0.0.1:{self.port}/postgres"

    @property
    def run_as(self) -> list[str]:
        # initdb refuses to run as root: run the server as the `postgres` system user then.
        return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run([*self.run_as, pg_bin("pg_ctl"), "-D", str(self.data / "db"), *args], check=True,
                       capture_output=True)

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._pg_ctl("-l", str(self.data / "server.log"), "-w", "-o",
                     f"-h 127.0.0.1 -p {self.port} -k {self.data} -c fsync=off", "start")

    def stop(self, mode: str = "fast") -> None:
        """`pg_ctl stop -m MODE`: fast rolls back open transactions and closes every connection."""
        self._pg_ctl("-m", mode, "-w", "stop")


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A fresh cluster (trust auth, fsync off) started for the body, stopped and removed afterwards."""
    data = Path(tempfile.mkdtemp(prefix="proxyloop-pg-"))
    server = PostgresServer(data=data, port=free_port())
    if server.run_as:
        shutil.chown(data, "postgres")
    subprocess.run([*server.run_as, pg_bin("initdb"), "-D", str(data / "db"), "-U", "proxyloop", "--auth=trust",
                    "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
    server.start()
    try:
        yield server
    finally:
        subprocess.run([*server.run_as, pg_bin("pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


def create_database(admin_url: str, name: str) -> str:
    """CREATE DATABASE `name` on the server of `admin_url`; returns its URL."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return admin_url.rsplit("/", 1)[0] + f"/{name}"
