"""Decode steps with and without the layer kernels (`kernels.decode_layer`, the whole layer in one
call; `kernels.rmsnorm`, `kernels.rope_store`), in one process, alternated, so that a noisy host
moves both sides alike.

    python benchmarks/layer_kernels_ab.py [--preset bench-490] [--batch 1] [--rounds 12] [--steps 33]
        [--switch decodes,normalises,stores]

`--switch decodes` compares the one call a layer with the layer's modules on the other kernels.

A random bf16 model of the preset, its linears packed as `cogvlm.load` packs them, one image
prompt per row (its features encoded once, outside the timing); each round decodes `--steps`
tokens with the kernels, then with PyTorch's ops in their place. Printed: the step time's minimum
and median on each side (ms). Needs our CPU kernels (AVX512-BF16 or AVX2 and a C compiler).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cogvlm import kernels
from cogvlm.bench import _DigitTokenizer, _random_image
from cogvlm.config import get_preset
from cogvlm.generation import BatchDecoder, GenerationConfig
from cogvlm.loading.packing import pack_linears
from cogvlm.model.cogvlm import CogVLMForCausalLM
from cogvlm.prompts import build_conversation_input_ids, collate

SWITCHES = ("decodes", "normalises", "stores")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bench-490")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=33)
    parser.add_argument("--switch", default=",".join(SWITCHES), help="the kernels switched off on one side")
    args = parser.parse_args()
    switched = args.switch.split(",")
    if not kernels.available():
        raise SystemExit("our CPU kernels do not run here: nothing to compare")
    torch.manual_seed(0)
    config = get_preset(args.preset)
    model = CogVLMForCausalLM(config).init_weights().to(torch.bfloat16).eval()
    pack_linears(model)
    size = config.vision_config.image_size
    requests = [
        build_conversation_input_ids(
            _DigitTokenizer(), config, query=f"Describe image {i}.", images=[_random_image(i, size)]
        )
        for i in range(args.batch)
    ]
    data = collate(requests)
    with torch.no_grad():
        data["image_features"] = model.model.encode_images(torch.stack([r["images"][0] for r in requests]).bfloat16())
    taken = {name: getattr(kernels, name) for name in switched}

    def step_ms(on: bool) -> float:
        for name in switched:
            setattr(kernels, name, taken[name] if on else (lambda *a: False))
        decoder = iter(BatchDecoder(model, data, [GenerationConfig(max_new_tokens=args.steps)] * args.batch, None))
        next(decoder)  # the prefill's token
        start = time.perf_counter()
        steps = sum(1 for _ in decoder)
        return (time.perf_counter() - start) / steps * 1e3

    step_ms(True), step_ms(False)  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for on in (True, False):
            times[on].append(step_ms(on))
    for on, label in ((True, "with them"), (False, f"without {args.switch}")):
        print(f"{label:<14} step ms: min {min(times[on]):.2f}  median {statistics.median(times[on]):.2f}")


if __name__ == "__main__":
    main()
