"""`cogvlm serve`: read the flags, resolve the model, then run the OpenAI-compatible server."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..errors import CogVLMError
from .options import add_loading_flags, load_options, load_pipeline


def cmd_serve(args: argparse.Namespace) -> int:
    checks = {
        "max_batch": (args.max_batch, 1, "--max-batch must be >= 1"),
        "max_queue": (args.max_queue, 0, "--max-queue must be >= 0"),
        "timeout_s": (args.timeout, 1e-9, "--timeout must be > 0"),
    }
    for value, least, message in (*checks.values(), (args.image_cache_mb, 0, "--image-cache-mb must be >= 0")):
        if value is not None and value < least:
            raise CogVLMError(message)
    from ..loading import resolve_folder
    from ..serve import EngineSettings, MediaPolicy, ServeSettings, create_app, serve_forever

    engine = EngineSettings(**{name: value for name, (value, _, _) in checks.items() if value is not None})
    options = load_options(args)
    folder = resolve_folder(options.model, options.revision)
    hub_id = [str(args.model)] if args.model and not Path(args.model).exists() else []
    names = tuple(args.served_model_name or dict.fromkeys([*hub_id, folder.name, "cogvlm-chat-17b"]))
    settings = ServeSettings(
        model_names=names,
        api_key=args.api_key,
        engine=engine,
        media=MediaPolicy(allow_remote=args.allow_remote_images),
    )
    # Load before binding the port: a model that cannot be loaded ends the command with its reason.
    pipeline = load_pipeline(args)
    if args.image_cache_mb is not None:
        from ..generation import ImageFeatureCache

        pipeline.image_cache = ImageFeatureCache(int(args.image_cache_mb * 2**20))
    serve_forever(create_app(pipeline, settings), host=args.host, port=args.port)
    return 0


def register(sub: Any) -> None:
    """Add serve to the command tree."""
    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server with a web page",
        description="Serve a model over an OpenAI-compatible HTTP API (POST /v1/chat/completions) "
        "with a chat page at /.",
    )
    p.set_defaults(func=cmd_serve)
    add_loading_flags(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument(
        "--api-key",
        default=os.environ.get("COGVLM_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $COGVLM_API_KEY, else none)",
    )
    g.add_argument(
        "--max-batch",
        type=int,
        help="requests decoded together, each holding a KV-cache slot of the whole context, reserved at "
        "start (default: the slots that fit 90%% of the memory free after the weights, less 1 GiB and the image "
        "cache; at most 32)",
    )
    g.add_argument(
        "--image-cache-mb",
        type=float,
        help="features of recent images kept, so an image sent again is not encoded again (default: 128; 0: none)",
    )
    g.add_argument("--max-queue", type=int, help="requests that may wait for a slot; more get 429 (default: 32)")
    g.add_argument("--timeout", type=float, help="seconds one request may take, waiting included (default: 300)")
    g.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="fetch http(s) image URLs (public addresses only); default: data: URLs only",
    )
    g.add_argument(
        "--served-model-name",
        action="append",
        metavar="NAME",
        help="model id clients send (repeatable; default: the model's name and cogvlm-chat-17b)",
    )
