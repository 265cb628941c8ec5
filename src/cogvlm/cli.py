"""The `cogvlm` command: a thin dispatcher over the library's functions.

Every user error (missing file, unreadable image, bad folder, bad flag) is one line on stderr
and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import CogVLMError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, status 2, no usage dump
        self.exit(2, f"cogvlm: error: {message} (see --help)\n")


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model folder (default: the shipped tiny model)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bf16 on GPUs, fp32 on CPU)")
    from .dispatch import add_deploy_flags

    add_deploy_flags(p)


def _gen_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--template", choices=("base", "chat", "vqa"), help="prompt template (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")


def _gen_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    names = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop")
    out = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if getattr(args, "do_sample", False):
        out["do_sample"] = True
    return out


def _load(args: argparse.Namespace):
    from .dispatch import deploy_kwargs
    from .pipeline import load

    return load(args.model, args.tokenizer, dtype=args.dtype, progress=True, **deploy_kwargs(args))


def _answer_record(image: str, query: str, result: Any, seconds: float) -> dict[str, Any]:
    boxes = [b.to_dict(result.width, result.height) for b in result.boxes]
    return {"image": image, "query": query, "answer": result.text, "boxes": boxes,
            "seconds": round(seconds, 4)}


def _print_result(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(record, ensure_ascii=False), flush=True)
        return
    print(f"{record['image']}: {record['answer']}")
    for box in record["boxes"]:
        print(f"  {box['label'] or '(box)'}: {tuple(box['pixels'])}")


def cmd_ask(args: argparse.Namespace) -> int:
    from .grounding import parse_boxes
    from .image import load_image
    from .pipeline import GroundingResult

    pictures = [load_image(path) for path in args.images]  # fail early, before loading
    vlm = _load(args)
    gen = _gen_kwargs(args)
    for start in range(0, len(pictures), args.batch_size):
        chunk = list(zip(args.images[start:start + args.batch_size], pictures[start:start + args.batch_size]))
        t0 = time.perf_counter()
        answers = vlm.batch([{"image": pic, "query": args.query, "template_version": args.template}
                             for _, pic in chunk], **gen)
        seconds = (time.perf_counter() - t0) / len(chunk)
        for (path, pic), text in zip(chunk, answers):
            result = GroundingResult(text, parse_boxes(text), pic.width, pic.height)
            _print_result(_answer_record(path, args.query, result, seconds), args.json)
    return 0


def _grounding_run(args: argparse.Namespace, queries: Sequence[str]) -> int:
    from .grounding import draw_boxes
    from .image import load_image

    pictures = [load_image(path) for path in args.images]
    vlm = _load(args)
    gen = _gen_kwargs(args)
    for path, picture, query in zip(args.images, pictures, queries):
        t0 = time.perf_counter()
        result = vlm.ground(picture, query, template_version=args.template or "base", **gen)
        _print_result(_answer_record(path, query, result, time.perf_counter() - t0), args.json)
        if args.draw:
            out = Path(args.draw) if len(args.images) == 1 else Path(args.draw).with_stem(
                f"{Path(args.draw).stem}-{Path(path).stem}")
            draw_boxes(picture, result.boxes).save(out)
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    from .prompts import GROUNDED_CAPTION

    return _grounding_run(args, [GROUNDED_CAPTION] * len(args.images))


def cmd_ground(args: argparse.Namespace) -> int:
    from .image import load_image
    from .prompts import box_to_caption_query, where_is_query

    if (args.query is None) == (args.box is None):
        raise CogVLMError("give exactly one of --query TEXT or --box X0,Y0,X1,Y1")
    args.images = [args.image]
    if args.query is not None:
        return _grounding_run(args, [where_is_query(args.query)])
    picture = load_image(args.image)
    return _grounding_run(args, [box_to_caption_query(args.box, picture.width, picture.height)])


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import interactive_chat

    return interactive_chat(_load(args), args.image, args.template, _gen_kwargs(args))


def cmd_info(args: argparse.Namespace, rest: list[str]) -> int:
    if any(arg.startswith("-") for arg in rest):  # placement flags (or --help): the plan
        from .dispatch import cli_info_plan

        return cli_info_plan(rest)
    from .info import describe

    if len(rest) != 1 or rest[0].startswith("-"):
        raise CogVLMError("usage: cogvlm info FOLDER_OR_PRESET [--device-map auto --max-memory 0=24GiB,...]")
    print(describe(rest[0]))
    return 0


def cmd_quantize(args: argparse.Namespace, rest: list[str]) -> int:
    from .quantize import cli_quantize

    return cli_quantize(rest)


def cmd_export_llm(args: argparse.Namespace) -> int:
    from .export import export_llm

    print(export_llm(args.folder, args.out))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    run_bench(args.preset, dtype=args.dtype, batch=args.batch, new_tokens=args.new_tokens,
              device=args.device, out=args.out)
    return 0


def cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    from .train import cli_main

    return cli_main(rest)


def cmd_serve(args: argparse.Namespace, rest: list[str]) -> int:
    from .serve import cli_main

    return cli_main(rest)


def cmd_eval(args: argparse.Namespace, rest: list[str]) -> int:
    from .eval import cli_main

    return cli_main(rest)


def cmd_data_synth(args: argparse.Namespace) -> int:
    from .synthetic import write_dataset

    print(write_dataset(args.out, n=args.n, seed=args.seed, size=args.size, easy=args.easy,
                        per_scene=args.per_scene, turns=args.turns))
    return 0


def cmd_data_tokenizer(args: argparse.Namespace) -> int:
    from .synthetic import corpus
    from .tokenizer_train import train_sentencepiece

    print(train_sentencepiece(corpus(args.seed, args.n), args.out, vocab_size=args.vocab_size))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cogvlm", description="CogVLM in plain PyTorch: chat, ask, ground, serve, train.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name: str, func: Callable, help: str, model: bool = True, gen: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        if model:
            _model_flags(p)
        if gen:
            _gen_flags(p)
        return p

    p = add("chat", cmd_chat, "interactive chat: history kept, 'clear' resets, an image path starts over")
    p.add_argument("--image", help="image to talk about (none: text only)")
    p = add("ask", cmd_ask, "one question about one or more images (batched)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--query", "-q", required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p = add("caption", cmd_caption, "grounded caption: a description with a box after each object")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--draw", metavar="OUT.png", help="write the image with labelled boxes")
    p.add_argument("--json", action="store_true")
    p = add("ground", cmd_ground, "where is X? (--query) or what is in this box? (--box, pixels)")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--query", "-q", help="an expression ('the red circle') or a full question")
    p.add_argument("--box", help="X0,Y0,X1,Y1 in pixels of IMAGE")
    p.add_argument("--draw", metavar="OUT.png")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("info", add_help=False,
                       help="architecture, parameters and weight memory of a folder or preset; with "
                            "--device-map / --max-memory / --quantize, the placement plan")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("quantize", add_help=False,
                       help="save a quantised checkpoint: cogvlm quantize FOLDER OUT --method int8")
    p.set_defaults(func=cmd_quantize)
    p = add("export-llm", cmd_export_llm, "write the language expert as a LLaMA checkpoint folder",
            model=False, gen=False)
    p.add_argument("folder")
    p.add_argument("out")
    p = add("bench", cmd_bench, "speed and memory of a preset: load, encode, TTFT, decode, roofline",
            model=False, gen=False)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8, help="the batched decode size")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", help="also write the figures as JSON here")
    p = sub.add_parser("train", help="train or fine-tune: cogvlm train CONFIG.yaml [--key value ...]",
                       add_help=False)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with a web page: cogvlm serve --help",
                       add_help=False)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("eval", help="benchmarks with their official metrics: cogvlm eval TASK | --list",
                       add_help=False)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("data", help="datasets")
    data = p.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    p = data.add_parser("synth", help="write a synthetic shapes dataset (images/ + data.jsonl)")
    p.set_defaults(func=cmd_data_synth)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=1000, help="number of scenes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--easy", action="store_true", help="1-2 large shapes on white")
    p.add_argument("--per-scene", type=int, default=3, help="records per scene")
    p.add_argument("--turns", type=int, default=1, help="questions per vqa conversation")
    p = data.add_parser("tokenizer", help="train a SentencePiece tokenizer on the synthetic texts")
    p.set_defaults(func=cmd_data_tokenizer)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=3000, help="number of scenes whose texts are used")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=512)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    delegated = argv[:1] in (["train"], ["eval"], ["serve"], ["info"], ["quantize"])  # own flags
    args, rest = (parser.parse_args(argv[:1]), argv[1:]) if delegated else (parser.parse_args(argv), [])
    try:
        return args.func(args, rest) if delegated else args.func(args)
    except CogVLMError as e:
        print(f"cogvlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
