"""A journal file that survives a writer killed mid-line.

Optuna's ``JournalFileBackend`` appends one JSON record per line under an O_EXCL lock file. A writer killed
mid-append (SIGKILL, out of memory, a node lost) leaves a last line without its newline. Optuna's reader
skips such a line while it is last, but the next append lands on the same line and turns it into invalid
JSON in the middle of the file: every later read (``--report`` included) then fails with a bare JSON error
that names neither the file nor the line.

Here a cut last line is moved into ``<journal>.corrupt`` (appended, kept for inspection) and the journal
truncated to its last complete line, always while holding the journal's own lock, so no writer appends
meanwhile and no live writer's half-written line is mistaken for a crash:

- when a storage is opened (``check_journal``): a last line without newline or not valid JSON is set
  aside; an unreadable line before it is an error naming the file and the line number;
- before every append (``RepairingLock``): a last line without newline is set aside, so a worker that
  outlives another one killed mid-write does not corrupt the journal either.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from optuna.storages.journal import JournalFileOpenLock

from sgexp.checks import fail

log = logging.getLogger("sgexp.sweeps.journal")

CORRUPT_SUFFIX = ".corrupt"


def _is_record(line: bytes) -> bool:
    """A complete journal line: a JSON object (Optuna writes one per line)."""
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return False


def cut_line_start(data: bytes, parse: bool) -> int | None:
    """Where a crash-cut last line starts in ``data``; None when the journal ends with a complete record.

    Without ``parse`` only a missing final newline counts (cheap: the check before every append)."""
    if not data:
        return None
    if not data.endswith(b"\n"):
        return data.rfind(b"\n") + 1
    start = data.rfind(b"\n", 0, len(data) - 1) + 1
    return start if parse and not _is_record(data[start:]) else None


def _fsync_dir(path: Path) -> None:
    """Make a truncation or a new file durable: the directory entry too (not possible on every platform)."""
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def set_aside_cut_line(path: Path, parse: bool = False) -> bool:
    """Move a crash-cut last line into ``<journal>.corrupt`` and truncate the journal before it.

    Call it only while holding the journal's lock. Returns True if something was set aside."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return False
        if not parse:
            f.seek(size - 1)
            if f.read(1) == b"\n":  # the common case: one byte read per append
                return False
        f.seek(0)
        data = f.read()
    start = cut_line_start(data, parse)
    if start is None:
        return False
    corrupt = Path(f"{path}{CORRUPT_SUFFIX}")
    with open(corrupt, "ab") as f:  # keep the bytes first, then drop them from the journal
        f.write(data[start:].rstrip(b"\n") + b"\n")
        f.flush()
        os.fsync(f.fileno())
    with open(path, "r+b") as f:
        f.truncate(start)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(path)
    log.warning(
        "journal %s: its last line (%d bytes) was cut by a crash; moved it into %s and truncated the journal to "
        "its last complete record",
        path,
        len(data) - start,
        corrupt,
    )
    return True


def first_bad_line(data: bytes) -> int | None:
    """The 1-based number of the first line that is not a journal record, the last line excepted."""
    lines = data.split(b"\n")
    if lines[-1] == b"":  # ends with a newline: the last line is the last complete one, else the cut one
        lines.pop()
    for number, line in enumerate(lines[:-1], start=1):
        if not _is_record(line):
            return number
    return None


class RepairingLock(JournalFileOpenLock):
    """The journal's O_EXCL lock that, once held, sets aside a crash-cut last line before the append."""

    def __init__(self, path: str):
        super().__init__(path)
        self.path = Path(path)

    def acquire(self) -> bool:
        super().acquire()
        try:
            set_aside_cut_line(self.path)
        except BaseException:
            self.release()
            raise
        return True


def check_journal(path: Path) -> None:
    """Before Optuna reads the journal: set aside a cut last line, fail on an unreadable earlier line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()  # unlocked: only lines before the final newline are certain to be complete
    number = first_bad_line(data)
    if number is not None:
        raise fail(
            "storage",
            str(path),
            f"line {number} of this Optuna journal is not a JSON record (corrupted in the middle, not by a cut "
            f"last line): fix or remove that line (keep a copy), or start a new study (--storage NEW)",
        )
    if cut_line_start(data, parse=True) is not None:  # maybe a live writer's line: look again under the lock
        lock = JournalFileOpenLock(str(path))
        lock.acquire()
        try:
            set_aside_cut_line(path, parse=True)
        finally:
            lock.release()
