"""`cogvlm train CONFIG.yaml [--key value ...]` and `cogvlm train merge CHECKPOINT OUT`."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_train(args: argparse.Namespace) -> int:
    from ..train import TrainConfig, merge_lora, run

    parser = args.parser_class
    if args.config == "merge":
        p = parser(prog="cogvlm train merge", description="Fold a LoRA checkpoint into a plain checkpoint.")
        p.add_argument("checkpoint")
        p.add_argument("out")
        merged = p.parse_args(args.overrides)
        print(merge_lora(merged.checkpoint, merged.out))
        return 0
    p = parser(prog="cogvlm train", description="--key value overrides the YAML (keys: see cogvlm.train.config)")
    for name in TrainConfig.__dataclass_fields__:
        p.add_argument(f"--{name}", nargs="?", const="true", default=argparse.SUPPRESS, metavar="VALUE")
    print(run(args.config, vars(p.parse_args(args.overrides))))
    return 0


def register(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """Add train to the command tree (its --key flags are the training config's keys)."""
    p = sub.add_parser(
        "train",
        help="train or fine-tune: cogvlm train CONFIG.yaml [--key value ...]",
        description="Train or fine-tune as CONFIG.yaml says; --key value overrides a key "
        "(keys: docs in cogvlm.train.config). 'cogvlm train merge CHECKPOINT OUT' "
        "folds a LoRA checkpoint into a plain one. Needs pip install 'cogvlm[train]'.",
    )
    p.add_argument("config", metavar="CONFIG.yaml|merge")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="--key value")
    p.set_defaults(func=cmd_train, parser_class=parser_class)
