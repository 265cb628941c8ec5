"""`cogvlm info`, `quantize`, `export-llm`, `bench` and `data`: checkpoints and datasets."""

from __future__ import annotations

import argparse
import time
from typing import Any

from .options import add_loading_flags, add_model_flag


def cmd_info(args: argparse.Namespace) -> int:
    placed = args.device_map is not None or args.max_memory is not None or args.quantize is not None
    if placed:
        from ..loading.placement import describe_plan, read_device_map

        print(
            describe_plan(
                args.model,
                read_device_map(args.device_map) or "auto",
                args.max_memory,
                args.dtype or "bfloat16",
                args.quantize,
                args.quantize_vision,
            )
        )
    else:
        from ..info import describe

        print(describe(args.model))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from ..loading.save_quantized import quantize_checkpoint

    t0 = time.perf_counter()
    summary = quantize_checkpoint(
        args.model,
        args.out,
        args.method,
        quantize_vision=args.quantize_vision,
        dtype=args.dtype,
        device=args.device,
        max_shard_size=args.max_shard_size,
        progress=True,
        revision=args.revision,
    )
    print(
        f"{args.out}: {summary['method']} ({summary['backend']}), {summary['bytes'] / 2**30:.2f} GiB "
        f"of weights, written in {time.perf_counter() - t0:.1f} s"
    )
    return 0


def cmd_export_llm(args: argparse.Namespace) -> int:
    from ..export import export_llm

    print(export_llm(args.model, args.out, revision=args.revision))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from ..bench import run_bench

    run_bench(
        args.preset,
        dtype=args.dtype,
        batch=args.batch,
        new_tokens=args.new_tokens,
        device=args.device,
        out=args.out,
        pack=not args.no_pack,
        model=args.model,
        cuda_graphs=args.cuda_graphs,
    )
    return 0


def _batch_sizes(text: str) -> list[int]:
    """'8' or '1,8,32': the batched decode sizes (checked before anything loads)."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 8 or 1,8,32 (got {text!r})") from None
    if any(n < 1 for n in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be >= 1 (got {text!r})")
    return sizes


def cmd_data_synth(args: argparse.Namespace) -> int:
    from ..synthetic import write_dataset

    print(
        write_dataset(
            args.out,
            n=args.n,
            seed=args.seed,
            size=args.size,
            easy=args.easy,
            per_scene=args.per_scene,
            turns=args.turns,
        )
    )
    return 0


def cmd_data_tokenizer(args: argparse.Namespace) -> int:
    from ..synthetic import corpus
    from ..tokenizer_train import train_sentencepiece

    print(train_sentencepiece(corpus(args.seed, args.n), args.out, vocab_size=args.vocab_size))
    return 0


def register(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """Add info, quantize, export-llm, bench and data to the command tree."""
    p = sub.add_parser(
        "info",
        help="architecture, parameters and weight memory of a model or preset; with "
        "--device-map / --max-memory / --quantize, the placement plan (nothing is loaded)",
    )
    p.set_defaults(func=cmd_info)
    p.add_argument(
        "model",
        metavar="MODEL",
        help="folder, hub id (config.json only is fetched), preset, or 'default' (the shipped tiny model)",
    )
    add_loading_flags(p, model=False, tokenizer=False)

    p = sub.add_parser("quantize", help="save a quantised checkpoint: cogvlm quantize MODEL OUT --method int8")
    p.set_defaults(func=cmd_quantize)
    add_model_flag(p, positional=True)
    p.add_argument("out", metavar="OUT")
    p.add_argument("--method", required=True, choices=("int8", "int4", "nf4"))
    p.add_argument("--quantize-vision", action="store_true", help="quantise the vision tower too")
    p.add_argument("--dtype", default="auto", help="compute dtype of the rest (default: auto, config.json's)")
    p.add_argument("--device", default="cpu", help="where to quantise (int4 saves only from cuda; default: cpu)")
    p.add_argument("--max-shard-size", default="5GB")

    p = sub.add_parser("export-llm", help="write the language expert as a LLaMA checkpoint folder")
    p.set_defaults(func=cmd_export_llm)
    add_model_flag(p, positional=True)
    p.add_argument("out", metavar="OUT")

    p = sub.add_parser("bench", help="speed and memory of a model: load, encode, TTFT, decode, roofline")
    p.set_defaults(func=cmd_bench)
    p.add_argument("--preset", default="tiny", help="random weights of this preset (default: tiny)")
    p.add_argument("--model", help="a checkpoint folder, hub id or 'default' instead of a preset's random weights")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=_batch_sizes, default=[8], help="batched decode sizes, e.g. 8 or 8,32 (default 8)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument(
        "--cuda-graphs",
        choices=("off", "on", "both"),
        default="off",
        help="decode replayed as CUDA graphs (on), eagerly (off) or both, each figure twice (CUDA only)",
    )
    p.add_argument(
        "--no-pack", action="store_true", help="plain linear layers on the CPU (default: weights prepacked for oneDNN)"
    )
    p.add_argument("--out", help="also write the figures as JSON here")

    p = sub.add_parser("data", help="datasets")
    data = p.add_subparsers(dest="data_command", required=True, parser_class=parser_class)
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
