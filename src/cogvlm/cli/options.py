"""The option groups every command shares: loading (model, tokenizer, placement) and generation.

Same names, defaults and help on every command that loads a model; `load_options` turns them
into the one `LoadOptions` the loading layer takes, checked before anything is loaded.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import CogVLMError, SettingsError

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
QUANTIZE_METHODS = ("int8", "int4", "nf4")


class Parser(argparse.ArgumentParser):
    """argparse with the house error: one line naming the command, exit status 2, no usage dump."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _max_memory(text: str) -> dict[int | str, int]:
    from ..loading.placement import parse_max_memory

    try:
        return parse_max_memory(text)
    except ValueError as e:  # argparse shows an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(e)) from None


def _dtype(text: str) -> str:
    from ..loading.files import resolve_dtype

    if text != "auto":
        try:
            resolve_dtype(text)
        except CogVLMError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_model_flag(p: argparse.ArgumentParser, positional: bool = False) -> None:
    """The model reference: `--model` (or a MODEL positional) and `--revision`."""
    text = "model folder or hub id (THUDM/cogvlm-chat-hf, ...)"
    if positional:
        p.add_argument("model", metavar="MODEL", help=text)
    else:
        p.add_argument("--model", metavar="MODEL", help=f"{text}; default: the shipped tiny model")
    p.add_argument("--revision", help="hub branch, tag or commit of a hub id (default: main)")


def add_loading_flags(
    p: argparse.ArgumentParser,
    model: bool = True,
    tokenizer: bool = True,
    device_default: str = "auto",
    dtype_default: str | None = None,
) -> None:
    """--model/--revision, --tokenizer, --device, --dtype and the placement and quantisation flags."""
    g = p.add_argument_group("model and placement (see docs/deploy.md)")
    if model:
        add_model_flag(g)
    if tokenizer:
        g.add_argument(
            "--tokenizer",
            metavar="TOKENIZER",
            help="tokenizer folder or hub id (default: the model's; CogVLM-1 folders ship none, "
            "so lmsys/vicuna-7b-v1.5 as the official model card says)",
        )
    g.add_argument(
        "--device", default=device_default, help=f"cpu, cuda, cuda:N, mps or auto (default: {device_default})"
    )
    g.add_argument(
        "--dtype",
        default=dtype_default,
        type=_dtype,
        help="float32, bfloat16, float16 or auto (config.json's); default: bfloat16 on GPUs, float32 elsewhere"
        if dtype_default is None
        else f"(default: {dtype_default})",
    )
    g.add_argument(
        "--device-map",
        metavar="MAP",
        help=f"{', '.join(DEVICE_MAP_STRATEGIES)}, or a JSON object or file {{module: device}}",
    )
    g.add_argument(
        "--max-memory",
        type=_max_memory,
        metavar="0=24GiB,1=24GiB,cpu=64GiB",
        help="memory budget per device for the plan",
    )
    g.add_argument("--offload-folder", metavar="DIR", help="where disk-offloaded weights of .bin checkpoints go")
    g.add_argument("--quantize", choices=QUANTIZE_METHODS, help="weight-only quantisation while loading")
    g.add_argument("--quantize-vision", action="store_true", help="quantise the vision tower too")


def load_options(args: argparse.Namespace, progress: bool = True) -> Any:
    """The `LoadOptions` the flags name (a device map given as JSON is read here, before loading)."""
    from ..loading import LoadOptions
    from ..loading.placement import read_device_map

    return LoadOptions(
        model=getattr(args, "model", None),
        revision=getattr(args, "revision", None),
        tokenizer=getattr(args, "tokenizer", None),
        dtype=args.dtype,
        device=args.device,
        device_map=read_device_map(args.device_map),
        max_memory=args.max_memory,
        offload_folder=args.offload_folder,
        quantize=args.quantize,
        quantize_vision=args.quantize_vision,
        progress=progress,
    )


def load_pipeline(args: argparse.Namespace) -> Any:
    """The Pipeline for the flags; says on stderr what an automatic placement chose."""
    import sys

    from ..pipeline import load

    vlm = load(load_options(args))
    if vlm.placement:
        print(f"cogvlm: {vlm.placement}", file=sys.stderr)
    return vlm


def add_generation_flags(p: argparse.ArgumentParser) -> None:
    """Decoding settings (default: the folder's generation_config.json, else greedy)."""
    g = p.add_argument_group("generation (default: the model's generation_config.json, else greedy)")
    g.add_argument("--template", choices=("base", "chat", "vqa"), help="prompt template (default: the model's)")
    g.add_argument("--max-new-tokens", type=int, default=None)
    sampling = g.add_mutually_exclusive_group()
    sampling.add_argument("--do-sample", action="store_true", default=None, help="sample instead of greedy decoding")
    sampling.add_argument(
        "--greedy",
        dest="do_sample",
        action="store_false",
        help="greedy decoding, whatever the model's generation_config.json says",
    )
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The decoding settings given on the command line, checked now (before the model loads)."""
    from ..generation.config import GenerationConfig

    names = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop")
    out = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    try:
        GenerationConfig(**{k: v for k, v in out.items() if k != "stop"})
    except SettingsError as e:
        raise CogVLMError(f"--{str(e).split()[0].replace('_', '-')}: {e}") from None
    return out
