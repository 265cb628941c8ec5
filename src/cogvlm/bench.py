"""`cogvlm bench`: speed and memory of a preset, measured in one run, with the decode roofline.

A random model of the preset is saved to a temporary folder (so loading is measured on real
files), then: load time and peak RSS while loading (in a fresh process); vision encode seconds
per image; time to first token of an image prompt; decode tokens/s at batch 1 and batch B; the
KV cache's size (grouped-query attention: the KV heads only) and this process's peak RSS; and
the roofline: weight (and KV) bytes a decode step must read over this machine's measured memory
bandwidth, against the step time achieved.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .config import get_preset
from .dropin import CogVLMForCausalLM
from .generation import BatchDecoder, GenerationConfig
from .loading.files import resolve_dtype
from .loading.packing import pack_linears
from .prompts import build_conversation_input_ids, collate

_LOAD_PROBE = """
import re, sys, time
from cogvlm.loading import load_model

def status(field):  # kB figures of this process (Linux): VmRSS now, VmHWM its peak
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

base = status("VmRSS")
t0 = time.perf_counter()
model = load_model(sys.argv[1], dtype=sys.argv[2])
seconds = time.perf_counter() - t0
loaded = status("VmHWM")
sum(float(p.detach().sum()) for p in model.parameters())  # read every weight (mmap pages in)
print(seconds, base, loaded, status("VmHWM"))
"""


class _DigitTokenizer:
    """Enough of a tokenizer for timing: one id per character, no files needed."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [3 + ord(c) % 250 for c in text]


def memory_bandwidth(nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Bytes per second this machine reads from memory (best of a few full-tensor sums)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    best = min(_timed(lambda: x.sum()) for _ in range(repeats))
    return nbytes / best


def _peak_rss() -> int:
    """Peak resident bytes of this process so far (Linux and macOS report different units)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _random_image(seed: int, size: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def _decode_bytes(model: CogVLMForCausalLM, context: int, batch: int) -> int:
    """Bytes one decode step reads: language-side weights (no embedding table) + the KV cache."""
    weights = sum(
        p.numel() * p.element_size()
        for n, p in model.named_parameters()
        if not n.startswith("model.vision") and "vision_" not in n and "embed_tokens" not in n
    )
    return weights + _kv_bytes(model, context, batch)


def _kv_bytes(model: CogVLMForCausalLM, context: int, batch: int) -> int:
    """Bytes of the KV cache for `batch` rows of `context` tokens: keys and values of the KV heads
    only (grouped-query attention: CogVLM2 keeps a quarter of the query heads' width)."""
    cfg = model.config
    width = cfg.num_kv_heads * cfg.head_dim
    return 2 * cfg.num_hidden_layers * batch * context * width * model.dtype.itemsize


def run_bench(
    preset: str,
    dtype: str = "float32",
    batch: int = 8,
    new_tokens: int = 32,
    device: str = "cpu",
    out: str | None = None,
    pack: bool = True,
) -> dict[str, Any]:
    """Measure and print the figures; returns them as a dict. `pack`: on the CPU, the linear
    weights prepacked for oneDNN as `cogvlm.load` does (`cogvlm.loading.packing`)."""
    config = get_preset(preset)
    torch_dtype = resolve_dtype(dtype)
    torch.manual_seed(0)
    model = CogVLMForCausalLM(config).init_weights().to(torch_dtype).eval()
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    figures: dict[str, Any] = {
        "preset": preset,
        "dtype": str(torch_dtype).replace("torch.", ""),
        "device": device,
        "threads": torch.get_num_threads(),
        "weight_MB": round(weight_bytes / 1e6, 1),
    }
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        probe = subprocess.run(
            [sys.executable, "-c", _LOAD_PROBE, tmp, figures["dtype"]], capture_output=True, text=True, check=True
        )
        seconds, base, loaded, touched = (float(v) for v in probe.stdout.split())
    figures |= {
        "load_s": round(seconds, 3),
        "load_peak_rss_MB": round(loaded / 1e6, 1),
        "load_rss_growth_over_weights": round((loaded - base) / weight_bytes, 3),
        "rss_growth_after_reading_weights": round((touched - base) / weight_bytes, 3),
    }

    model = model.to(device)
    weight_read = _decode_bytes(model, 0, 1)  # counted before packing: packed weights are not parameters
    figures["packed_linears"] = pack_linears(model) if pack and torch.device(device).type == "cpu" else 0
    tok = _DigitTokenizer()
    size = config.vision_config.image_size

    def request(i: int) -> dict[str, Any]:
        return build_conversation_input_ids(
            tok, config, query=f"Describe image {i}.", images=[_random_image(i, size)], template_version="chat"
        )

    with torch.no_grad():
        pixels = request(0)["images"][0][None].to(device, torch_dtype)
        model.model.encode_images(pixels)
        figures["vision_encode_s_per_image"] = round(
            min(_timed(lambda: model.model.encode_images(pixels)) for _ in range(3)), 4
        )

    def run(n: int, steps: int) -> tuple[float, float]:
        """(seconds to first token, decode seconds per step) for n image requests."""
        samples = [request(i) for i in range(n)]
        data = collate(samples)
        data["images"] = [[img.to(torch_dtype) for img in imgs] for imgs in data["images"]]
        config_ = GenerationConfig(max_new_tokens=steps)
        decoder = BatchDecoder(model, data, [config_] * n, eos_token_id=None)
        t0 = time.perf_counter()
        stamps = [time.perf_counter() - t0 for _ in decoder]
        return stamps[0], (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)

    run(1, 2)  # warm-up
    ttft, step1 = run(1, new_tokens)
    _, step_b = run(batch, new_tokens)
    prompt = len(request(0)["input_ids"])
    context = prompt + new_tokens
    bandwidth = memory_bandwidth()
    floor = (weight_read + _kv_bytes(model, context, 1)) / bandwidth
    figures |= {
        "image_tokens": config.image_tokens,
        "prompt_tokens": prompt,
        "kv_cache_MB_b1": round(_kv_bytes(model, context, 1) / 1e6, 1),
        f"kv_cache_MB_b{batch}": round(_kv_bytes(model, context, batch) / 1e6, 1),
        "ttft_s": round(ttft, 4),
        "decode_tok_s_b1": round(1 / step1, 2),
        f"decode_tok_s_b{batch}": round(batch / step_b, 2),
        "batch_speedup": round(step1 * batch / step_b, 2),
        "memory_bandwidth_GB_s": round(bandwidth / 1e9, 2),
        "roofline_step_ms_b1": round(floor * 1e3, 3),
        "decode_step_ms_b1": round(step1 * 1e3, 3),
        "roofline_pct_b1": round(100 * floor / step1, 1),
        "peak_rss_MB": round(_peak_rss() / 1e6, 1),
    }
    width = max(map(len, figures))
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    if out:
        Path(out).write_text(json.dumps(figures, indent=2) + "\n")
    return figures
