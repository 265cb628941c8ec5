"""`cogvlm ask`, `caption`, `ground` and `chat`: questions about images, on the Pipeline API."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

from ..errors import CogVLMError
from .options import add_generation_flags, add_loading_flags, generation_kwargs, load_pipeline


def _query(text: str) -> str:
    """A question with words in it (checked before anything loads)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty or blank")
    return text


def _answer_record(image: str, query: str, result: Any, seconds: float) -> dict[str, Any]:
    boxes = [b.to_dict(result.width, result.height) for b in result.boxes]
    return {"image": image, "query": query, "answer": result.text, "boxes": boxes, "seconds": round(seconds, 4)}


def _print_result(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(record, ensure_ascii=False), flush=True)
        return
    print(f"{record['image']}: {record['answer']}")
    for box in record["boxes"]:
        print(f"  {box['label'] or '(box)'}: {tuple(box['pixels'])}")


def cmd_ask(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise CogVLMError(f"--batch-size must be >= 1 (got {args.batch_size})")
    gen = generation_kwargs(args)
    from ..grounding import parse_boxes
    from ..image import load_image
    from ..pipeline import GroundingResult

    pictures = [load_image(path) for path in args.images]  # fail early, before loading
    vlm = load_pipeline(args)
    for start in range(0, len(pictures), args.batch_size):
        chunk = list(zip(args.images[start : start + args.batch_size], pictures[start : start + args.batch_size]))
        t0 = time.perf_counter()
        answers = vlm.batch(
            [{"image": pic, "query": args.query, "template_version": args.template} for _, pic in chunk], **gen
        )
        seconds = (time.perf_counter() - t0) / len(chunk)
        for (path, pic), text in zip(chunk, answers):
            result = GroundingResult(text, parse_boxes(text), pic.width, pic.height)
            _print_result(_answer_record(path, args.query, result, seconds), args.json)
    return 0


def _grounding_run(args: argparse.Namespace, queries: Sequence[str]) -> int:
    gen = generation_kwargs(args)
    from ..grounding import draw_boxes
    from ..image import load_image

    pictures = [load_image(path) for path in args.images]
    vlm = load_pipeline(args)
    for path, picture, query in zip(args.images, pictures, queries):
        t0 = time.perf_counter()
        result = vlm.ground(picture, query, template_version=args.template or "base", **gen)
        _print_result(_answer_record(path, query, result, time.perf_counter() - t0), args.json)
        if args.draw:
            out = (
                Path(args.draw)
                if len(args.images) == 1
                else Path(args.draw).with_stem(f"{Path(args.draw).stem}-{Path(path).stem}")
            )
            draw_boxes(picture, result.boxes).save(out)
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    from ..prompts import GROUNDED_CAPTION

    return _grounding_run(args, [GROUNDED_CAPTION] * len(args.images))


def cmd_ground(args: argparse.Namespace) -> int:
    if (args.query is None) == (args.box is None):
        raise CogVLMError("give exactly one of --query TEXT or --box X0,Y0,X1,Y1")
    from ..image import load_image
    from ..prompts import box_to_caption_query, where_is_query

    args.images = [args.image]
    if args.query is not None:
        return _grounding_run(args, [where_is_query(args.query)])
    picture = load_image(args.image)
    return _grounding_run(args, [box_to_caption_query(args.box, picture.width, picture.height)])


def cmd_chat(args: argparse.Namespace) -> int:
    from ..chat import interactive_chat

    gen = generation_kwargs(args)
    return interactive_chat(load_pipeline(args), args.image, args.template, gen)


def register(sub: Any) -> None:
    """Add ask, caption, ground and chat to the command tree."""

    def add(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        add_loading_flags(p)
        add_generation_flags(p)
        return p

    p = add("chat", cmd_chat, "interactive chat: history kept, 'clear' resets, an image path starts over")
    p.add_argument("--image", help="image to talk about (none: text only)")
    p = add("ask", cmd_ask, "one question about one or more images (batched)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--query", "-q", required=True, type=_query)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p = add("caption", cmd_caption, "grounded caption: a description with a box after each object")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--draw", metavar="OUT.png", help="write the image with labelled boxes")
    p.add_argument("--json", action="store_true")
    p = add("ground", cmd_ground, "where is X? (--query) or what is in this box? (--box, pixels)")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--query", "-q", type=_query, help="an expression ('the red circle') or a full question")
    p.add_argument("--box", help="X0,Y0,X1,Y1 in pixels of IMAGE")
    p.add_argument("--draw", metavar="OUT.png")
    p.add_argument("--json", action="store_true")
