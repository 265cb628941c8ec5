"""Images/s of a batch job (`cogvlm.batch_infer`) at several batch sizes, and the share of its wall
time the model is busy rather than waiting for images.

    python benchmarks/batch_bench.py                                  # the shipped model and bench-490
    python benchmarks/batch_bench.py --models default --images 256 --batches 1,8,32

The images are synthetic shape scenes saved as JPEG at --side pixels (so each is decoded and resized,
as a real collection's are); every run answers all of them from scratch (overwrite) with the
captioning prompt, greedy, at most --max-new-tokens tokens. `bench-490` is a random model of that
preset (the real 490 px image geometry, 1227 image tokens, with reduced widths) with the shipped
tokenizer, so with that tokenizer's 512-token vocabulary (a random model's tokens must decode; the
output layer is the one part smaller than the preset's); its answers are noise that runs to the
token limit. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

import cogvlm
from cogvlm.config import get_preset
from cogvlm.dropin import CogVLMForCausalLM
from cogvlm.loading import DEFAULT_MODEL, resolve_config
from cogvlm.synthetic import make_scene


def draw(folder: Path, n: int, side: int) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        make_scene(random.Random(i), size=side).render().save(folder / f"scene{i:04d}.jpg", quality=90)


def load(name: str, tmp: Path) -> cogvlm.Pipeline:
    """The shipped model, or a random model of a preset saved and loaded as a folder."""
    if name == "default":
        return cogvlm.load(device="cpu")
    torch.manual_seed(0)
    config = dataclasses.replace(get_preset(name), vocab_size=resolve_config(None)[0].vocab_size)
    CogVLMForCausalLM(config).init_weights().save_pretrained(tmp / name)
    return cogvlm.load(tmp / name, tokenizer=DEFAULT_MODEL, device="cpu")


def measure(name: str, images: int, batches: list[int], args: argparse.Namespace, tmp: Path) -> list[dict]:
    folder = tmp / f"images-{name}"
    draw(folder, images, args.side)
    vlm = load(name, tmp)
    settings = {"max_new_tokens": args.max_new_tokens, "progress": False, "overwrite": True}
    cogvlm.batch_infer(sorted(folder.iterdir())[:2], tmp / "warm.jsonl", model=vlm, **settings)
    results = []
    for batch in batches:
        summary = cogvlm.batch_infer(folder, tmp / "out.jsonl", model=vlm, batch_size=batch, **settings)
        assert summary.done == images, summary
        results.append({"model": name, "images": images, "batch": batch, "summary": summary})
        print(f"{name} batch {batch}: {summary}", flush=True)
    return results


def table(results: list[dict]) -> str:
    lines = ["| model | images | batch | images/s | model busy | wall s |", "|---|---|---|---|---|---|"]
    for r in results:
        s = r["summary"]
        lines.append(
            f"| {r['model']} | {r['images']} | {r['batch']} | {s.images_per_s:.2f} | {s.busy_share:.1%} "
            f"| {s.seconds:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="default,bench-490", help="'default' and/or preset names")
    p.add_argument("--images", type=int, default=256, help="images for the shipped model")
    p.add_argument("--preset-images", type=int, default=32, help="images for a preset's random model")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--side", type=int, default=512, help="side of the JPEG images in pixels")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    started = time.strftime("%Y-%m-%d %H:%M")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            n = args.images if name == "default" else args.preset_images
            results += measure(name, n, batches, args, Path(tmp))
    print(
        f"\n{started}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.side} px JPEG, max_new_tokens {args.max_new_tokens}\n"
    )
    print(table(results))


if __name__ == "__main__":
    main()
