"""`cogvlm serve`: an OpenAI-compatible HTTP server with continuous batching and a web page.

    >>> app = create_app(cogvlm.load("path/to/model"), ServeSettings(api_key="secret"))
    >>> with running(app) as url:      # a live server on 127.0.0.1 in a background thread
    ...     ...

Needs the `serve` extra: pip install 'cogvlm[serve]'.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

try:
    import uvicorn
    from fastapi import FastAPI

    from .app import ServeSettings, create_app
except ModuleNotFoundError as e:  # pragma: no cover - depends on the installed extras
    if e.name not in {"fastapi", "starlette", "uvicorn", "httpx", "pydantic"}:
        raise
    raise ModuleNotFoundError(f"cogvlm serve needs {e.name}: pip install 'cogvlm[serve]'", name=e.name) from None
from .engine import EngineSettings
from .media import MediaPolicy

__all__ = ["serve_forever", "create_app", "running", "ServeSettings", "EngineSettings", "MediaPolicy"]


def serve_forever(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run `app` with uvicorn until interrupted (what `cogvlm serve` does once its flags are read)."""
    uvicorn.run(app, host=host, port=port, log_level="info")


@contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` from a background thread (tests, notebooks); yields its base URL, and stops
    it on exit. Port 0 picks a free port."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="cogvlm-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
