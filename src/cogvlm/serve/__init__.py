"""`cogvlm serve`: an OpenAI-compatible HTTP server with continuous batching and a web page.

    >>> app = create_app(cogvlm.load("path/to/model"), ServeSettings(api_key="secret"))
    >>> with running(app) as url:      # a live server on 127.0.0.1 in a background thread
    ...     ...

Needs the `serve` extra: pip install 'cogvlm[serve]'.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

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

__all__ = ["cli_main", "create_app", "running", "ServeSettings", "EngineSettings", "MediaPolicy"]


def _parser() -> argparse.ArgumentParser:
    from ..cli import _Parser  # the command's one-line errors, exit status 2

    p = _Parser(prog="cogvlm serve", description="Serve a model over an OpenAI-compatible HTTP API "
                "(POST /v1/chat/completions) with a chat page at /.")
    p.add_argument("--model", help="model folder (default: the shipped tiny model)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bf16 on GPUs, fp32 on CPU)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("COGVLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $COGVLM_API_KEY, else none)")
    p.add_argument("--max-batch", type=int, default=EngineSettings.max_batch,
                   help="requests decoded together (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=EngineSettings.max_queue,
                   help="requests that may wait for a slot; more get 429 (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=EngineSettings.timeout_s,
                   help="seconds one request may take, waiting included (default: %(default)s)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (public addresses only); default: data: URLs only")
    p.add_argument("--served-model-name", action="append", metavar="NAME",
                   help="model id clients send (repeatable; default: the folder name and cogvlm-chat-17b)")
    return p


def cli_main(argv: Sequence[str] | None = None) -> int:
    """Run the server until interrupted; returns the exit status (2 for bad arguments)."""
    from ..pipeline import DEFAULT_MODEL, load

    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad flag (already reported on one line)
        return int(e.code or 0)
    folder = Path(args.model) if args.model else DEFAULT_MODEL
    problems = [(args.max_batch < 1, "--max-batch must be >= 1"), (args.max_queue < 0, "--max-queue must be >= 0"),
                (args.timeout <= 0, "--timeout must be > 0"),
                (not (folder / "config.json").is_file(), f"{folder}: not a model folder (no config.json)")]
    for bad, message in problems:
        if bad:
            print(f"cogvlm serve: error: {message}", file=sys.stderr)
            return 2
    names = tuple(args.served_model_name or (folder.name, "cogvlm-chat-17b"))
    settings = ServeSettings(model_names=names, api_key=args.api_key,
                             engine=EngineSettings(args.max_batch, args.max_queue, args.timeout),
                             media=MediaPolicy(allow_remote=args.allow_remote_images))
    loader = functools.partial(load, folder, device=args.device, dtype=args.dtype)
    uvicorn.run(create_app(loader, settings), host=args.host, port=args.port, log_level="info")
    return 0


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
