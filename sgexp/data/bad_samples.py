"""Bad data in shards: the error strict mode raises, and the counter every reader reports to.

The lowest module of the readers: ``latent_format`` (the latent decoder), ``shards``
(the tar stages and the PNG decoder) and ``stream`` all report here.
"""

from __future__ import annotations

import logging
import multiprocessing
import re

log = logging.getLogger(__name__)


class ShardError(RuntimeError):
    """Bad data in a shard, raised in strict mode; the message names the shard file."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        # webdataset appends (stream, url) to exn.args while the error travels up its
        # generators; keep the message readable regardless.
        return self.message


class BadSamples:
    """Counts bad samples across DataLoader workers, and skips them (default) or raises (strict).

    Also a webdataset ``handler=``: called with an exception, returns True to skip
    it. The counter lives in shared memory so that the main process reads what its
    workers counted (it must reach them at worker start, as DataLoader does).
    """

    def __init__(self, strict: bool = False, max_warnings: int = 5):
        self.strict = strict
        self.max_warnings = max_warnings
        # a spawn-context lock can be handed to fork, spawn and forkserver workers alike
        self._count = multiprocessing.get_context("spawn").Value("q", 0)

    @property
    def count(self) -> int:
        return self._count.value

    def __call__(self, exn: Exception) -> bool:
        if isinstance(exn, ShardError):  # already judged deeper in the pipeline
            raise exn
        self.report(shard_of(exn), f"{type(exn).__name__}: {exn.args[0] if exn.args else ''}")
        return True

    def report(self, shard: str, what: str) -> None:
        if self.strict:
            raise ShardError(f"bad data in shard {shard}: {what}")
        with self._count.get_lock():
            self._count.value += 1
            n = self._count.value
        if n <= self.max_warnings:
            more = " (further bad samples are counted, not logged)" if n == self.max_warnings else ""
            log.warning("skipping bad data in shard %s: %s%s", shard, what, more)


def shard_of(exn: Exception) -> str:
    """The shard a webdataset exception is about: it appends the url (or the open file) to ``args``."""
    for arg in reversed(exn.args):
        found = re.search(r"[^\s'\"<>()]+\.tar\b", str(arg))
        if found:
            return found.group(0)
    return "<unknown shard>"
