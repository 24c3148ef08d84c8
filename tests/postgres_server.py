"""A real PostgreSQL server for tests (Debian's ``postgresql``; .ci/run installs it): what a large cluster
uses as the Optuna storage of a sweep and as the MLflow server's backend store.

``postgres_server(tmp)`` initialises a data directory under ``tmp`` (``initdb``, as the ``postgres`` user
when run as root: the server refuses to run as root), starts it with ``pg_ctl`` on 127.0.0.1 on a free port
(TCP only, password authentication), creates the databases asked for, and stops it on exit (``pg_ctl stop
-m fast``, which also ends open connections), also when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port

USER = "sgexp"


def bin_dir() -> Path | None:
    """The server's binaries: on PATH, else Debian's /usr/lib/postgresql/<newest major>/bin (not on PATH)."""
    if shutil.which("pg_ctl") and shutil.which("initdb"):
        return Path(shutil.which("pg_ctl")).resolve().parent
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


def missing() -> str | None:
    """Why no server can be started here (None: it can)."""
    if bin_dir() is None:
        return "PostgreSQL is not installed (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "no 'postgres' user to run the server as (Debian's postgresql package creates it)"
    return None


@dataclass(frozen=True)
class Postgres:
    port: int
    password: str

    def url(self, database: str, password: bool = True) -> str:
        """SQLAlchemy's URL of ``database`` (psycopg2); ``password=False``: without the password, which libpq
        then reads from ``PGPASSWORD`` or ``~/.pgpass`` (what keeps it out of scripts, process lists, logs)."""
        secret = f":{self.password}" if password else ""
        return f"postgresql+psycopg2://{USER}{secret}@127.0.0.1:{self.port}/{database}"


def _pg(folder: Path, program: str, *args: str) -> subprocess.CompletedProcess:
    """Run one of the server's programs in ``folder``, as the ``postgres`` user when we are root."""
    cmd = [str(bin_dir() / program), *args]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, cwd=folder, capture_output=True, text=True)


def _let_server_user_in(path: Path) -> None:
    """pytest makes its tmp folders 0700 (root's, when run as root): give others search permission (x, no
    listing) on ``path`` and its parents under the system's temp folder, so that the ``postgres`` user
    reaches its data (pytest sets its ``pytest-of-<user>`` folder back to 0700 at its next start)."""
    top = Path(tempfile.gettempdir()).resolve()
    for folder in [path, *path.parents]:
        if folder.stat().st_mode & 0o001:
            continue
        if top not in folder.parents:
            pytest.fail(f"the postgres user cannot reach {path}: {folder} is not searchable (basetemp under {top})")
        folder.chmod(folder.stat().st_mode | 0o001)


@contextlib.contextmanager
def postgres_server(tmp: Path, databases: tuple[str, ...] = ()) -> Iterator[Postgres]:
    """A PostgreSQL server with its data in ``tmp/data``, log ``tmp/server.log``, the ``databases`` created."""
    import psycopg2  # a dev extra, like the server: only these tests need it

    reason = missing()
    if reason is not None:
        pytest.fail(reason)
    tmp.mkdir(parents=True)
    server = Postgres(port=free_port(), password=secrets.token_hex(8))
    if os.geteuid() == 0:
        _let_server_user_in(tmp)
        user = pwd.getpwnam("postgres")
        os.chown(tmp, user.pw_uid, user.pw_gid)
    data, log = tmp / "data", tmp / "server.log"
    (tmp / "password").write_text(server.password)
    (tmp / "password").chmod(0o600)
    if os.geteuid() == 0:
        os.chown(tmp / "password", user.pw_uid, user.pw_gid)

    done = _pg(tmp, "initdb", "-D", str(data), "-U", USER, f"--pwfile={tmp / 'password'}", "--auth=scram-sha-256")
    assert done.returncode == 0, f"initdb failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    # TCP on loopback only (no Unix socket: its path would be too long under pytest's tmp); fsync off: a test
    # server, nothing to keep after a crash
    options = f"-h 127.0.0.1 -p {server.port} -k '' -c fsync=off"
    started = _pg(tmp, "pg_ctl", "start", "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options)
    try:
        if started.returncode != 0:
            pytest.fail(f"PostgreSQL did not start:\n{started.stderr[-2000:]}\n{log.read_text()[-3000:]}")
        with contextlib.closing(
            psycopg2.connect(host="127.0.0.1", port=server.port, user=USER, password=server.password, dbname="postgres")
        ) as connection:
            connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with connection.cursor() as cursor:
                for name in databases:
                    cursor.execute(f'CREATE DATABASE "{name}"')
        yield server
    finally:
        stop(server, data, log)


def stop(server: Postgres, data: Path, log: Path) -> None:
    """``pg_ctl stop -m fast`` (ends the open connections, then shuts down cleanly); if that fails, the same
    signal (SIGINT) to the server's process by its pid file, and SIGKILL after 30 s."""
    if os.geteuid() == 0:
        _let_server_user_in(data.parent)  # another pytest session may have reset pytest-of-root to 0700
    stopped = _pg(data.parent, "pg_ctl", "stop", "-D", str(data), "-m", "fast", "-w", "-t", "60")
    pid_file = data / "postmaster.pid"
    if not pid_file.is_file():  # stopped (or it never started)
        return
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 30
        while pid_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid_file.is_file():
            os.kill(pid, signal.SIGKILL)
    pytest.fail(f"pg_ctl stop failed (port {server.port}):\n{stopped.stderr[-2000:]}\n{log.read_text()[-3000:]}")
