"""Pretrained weights sgexp fetches (the SD-VAE, clean-fid's Inception): local copies first, then a download.

A download is tried only where the host answers, so that an offline compute node
fails at once with a message saying where to put the file, instead of hanging in
a library's retry loop. Imports nothing from sgexp: ``sgexp.vae`` and ``sgexp.eval``
both use it.
"""

from __future__ import annotations

import socket
import threading
from urllib.parse import urlparse


def internet_reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether ``url``'s host accepts a TCP connection within ``timeout`` s, DNS lookup included."""
    host, answer = urlparse(url).hostname, []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    # a thread bounds the DNS lookup too (socket timeouts do not); daemon, so that a lookup
    # stuck past the timeout does not hold up the interpreter's exit
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])
