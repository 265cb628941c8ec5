"""A request's prefill when its slot still holds the [BOS, image] prefix a finished request left there
(the server's next chat turn about one image) against the same prefill computing it, in one process,
alternated, so that a noisy host moves both sides alike.

    python benchmarks/prefix_reuse.py [--preset bench-490] [--dtype bfloat16] [--rounds 5]

A random model of the preset, its linears packed as `cogvlm.load` packs them, one slot (as the
server's `DecodeState`), the image's features encoded once outside the timing (the server's image
cache). Each round: a question about image B, so the slot keeps B; then one about image A, which
computes A's prefix (timed: "computed"); then another about A, which finds it (timed: "kept").
Printed: the prefill time's minimum and median on each side (s), and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from PIL import Image

from cogvlm.bench import _DigitTokenizer, _random_image
from cogvlm.config import CogVLMConfig, get_preset
from cogvlm.generation import GenerationConfig
from cogvlm.generation.decoder import DecodeState, Row
from cogvlm.loading.packing import pack_linears
from cogvlm.model.cogvlm import CogVLMForCausalLM
from cogvlm.prompts import build_conversation_input_ids, collate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bench-490")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = get_preset(args.preset)
    model = CogVLMForCausalLM(config).init_weights().to(dtype).eval()
    pack_linears(model)
    size = config.vision_config.image_size
    images = {name: _random_image(seed, size) for name, seed in (("A", 1), ("B", 2))}
    with torch.no_grad():
        features = {
            name: model.model.encode_images(torch.stack([build(config, "?", image)["images"][0]]).to(dtype))
            for name, image in images.items()
        }
    state = DecodeState(model, 1, config.image_tokens + 64)

    def prefill_s(name: str, query: str) -> float:
        sample = build(config, query, images[name])
        batch = collate([sample]) | {"image_features": features[name]}
        row = Row(GenerationConfig(), sample["input_ids"])
        start = time.perf_counter()
        with torch.no_grad():
            state.admit([row], batch, share_prefix=True)
        seconds = time.perf_counter() - start
        state.release(row)
        return seconds

    times: dict[str, list[float]] = {"computed": [], "kept": []}
    for i in range(args.rounds + 1):  # the first round warms up
        prefill_s("B", "What is in image B?")
        computed, kept = prefill_s("A", "Describe image A."), prefill_s("A", "And what colour is it?")
        if i:
            times["computed"].append(computed)
            times["kept"].append(kept)
    for side, seconds in times.items():
        print(f"{side:<9} prefill s: min {min(seconds):.3f}  median {statistics.median(seconds):.3f}")
    ratio = statistics.median(times["computed"]) / statistics.median(times["kept"])
    print(f"prefix tokens {1 + config.image_tokens}; computed / kept (medians): {ratio:.1f}x")


def build(config: CogVLMConfig, query: str, image: Image.Image) -> dict[str, Any]:
    """A prompt about one image in the preset's template, with the bench's digit tokenizer."""
    return build_conversation_input_ids(_DigitTokenizer(), config, query=query, images=[image])


if __name__ == "__main__":
    main()
