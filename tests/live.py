"""A real uvicorn in this process, configured as ``usagemeter serve`` configures it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

from usagemeter import logs
from usagemeter.serving import ServeLimits, uvicorn_config


def serve_in_thread(
    app: Any, limits: ServeLimits, access_log: bool = False
) -> Iterator[tuple[str, int]]:
    """``app`` on a real uvicorn, configured as ``usagemeter serve`` does, on a free port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    address = sock.getsockname()
    config = uvicorn_config(app, "127.0.0.1", 0, access_log, limits)
    config.log_level = "info" if access_log else "critical"
    server = uvicorn.Server(config)
    logs.install()  # as serve does, once uvicorn has set up its loggers
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield address
    finally:
        server.should_exit = True
        thread.join(10)
