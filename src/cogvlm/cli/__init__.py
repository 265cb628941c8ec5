"""The `cogvlm` command: one parser tree over the library's functions.

Every user error (a bad flag, a missing file, an unreadable image, a model that cannot be had,
a missing optional extra) is one line on stderr and exit status 2; Ctrl-C is 130.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..errors import CogVLMError
from . import answer, batch, eval, serve, tools, train
from .options import Parser

#: Optional packages and the extra that brings each (a missing one is named with its install line).
EXTRAS = {
    "accelerate": "quant",
    "torchao": "quant",
    "bitsandbytes": "cuda",
    "peft": "train",
    "yaml": "train",
    "fastapi": "serve",
    "starlette": "serve",
    "uvicorn": "serve",
    "httpx": "serve",
    "pydantic": "serve",
    "pycocoevalcap": "eval",
    "psutil": "quant",
}


def build_parser() -> Parser:
    parser = Parser(prog="cogvlm", description="CogVLM in plain PyTorch: chat, ask, ground, serve, eval, train.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    answer.register(sub)
    batch.register(sub)
    serve.register(sub)
    eval.register(sub)
    train.register(sub, Parser)
    tools.register(sub, Parser)
    for name, command in sub.choices.items():
        command.set_defaults(prog=f"cogvlm {name}")
    return parser


def _missing_extra(error: ModuleNotFoundError, command: str) -> str | None:
    """'cogvlm train needs peft: pip install ...' for an optional package, None for any other module."""
    name = (error.name or "").split(".")[0]
    extra = EXTRAS.get(name)
    if extra is None:
        return None
    if command == "train" and name in ("accelerate", "psutil"):
        extra = "train"
    return f"needs {name}, which is not installed: pip install 'cogvlm[{extra}]'"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
        if unknown:  # reported by the command they were given to, like every other bad flag
            Parser(prog=args.prog).error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as e:  # --help (0), or a bad flag already reported on one line (2)
        return int(e.code or 0)
    code = _run(args)
    launcher = sys.modules.get("cogvlm.launcher")  # imported only by the commands that use it
    if launcher is not None and launcher.joined():
        launcher.end_process(code)
    return code


def _run(args: argparse.Namespace) -> int:
    """The command's exit status; its errors reported on one line."""
    try:
        return args.func(args)
    except CogVLMError as e:
        print(f"cogvlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        message = _missing_extra(e, args.command)
        if message is None:
            raise
        print(f"cogvlm {args.command}: error: {message}", file=sys.stderr)
        return 2
    except SystemExit as e:  # a command's own parser (train's --key flags): already said on one line
        return int(e.code or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
