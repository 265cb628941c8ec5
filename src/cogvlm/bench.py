"""`cogvlm bench`: speed and memory of a model, measured in one run, with the decode roofline.

The model is a checkpoint (`model`: a folder or hub id, loaded as `cogvlm.load` loads it) or a
random model of a preset saved to a temporary folder (so loading is measured on real files).
Then: load time and peak RSS while loading (in a fresh process); vision encode seconds per
image; time to first token of an image prompt; decode tokens/s at batch 1 and at each batch
size asked for, eagerly and/or replayed as CUDA graphs; the KV cache's size (grouped-query
attention: the KV heads only); this process's peak RSS, and on CUDA the peak memory allocated
in each run; and the roofline: weight (and KV) bytes a decode step must read over this
machine's measured memory bandwidth, against the step time achieved.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from .config import get_preset
from .dropin import CogVLMForCausalLM
from .errors import SettingsError
from .fileio import atomic_write_text
from .generation import BatchDecoder, GenerationConfig
from .loading import load_model, resolve_folder
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


def memory_bandwidth(nbytes: int = 1 << 30, repeats: int = 20, device: str = "cpu") -> float:
    """Bytes per second `device` reads from its memory (best of a few full-tensor sums)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)

    def read() -> None:
        x.sum()
        sync()

    read()
    return nbytes / min(_timed(read) for _ in range(repeats))


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


#: `cuda_graphs`: decode eagerly, replayed as CUDA graphs, or both (each decode figure twice).
GRAPH_MODES: dict[str, tuple[bool, ...]] = {"off": (False,), "on": (True,), "both": (False, True)}


def run_bench(
    preset: str | None = "tiny",
    dtype: str = "float32",
    batch: int | Sequence[int] = 8,
    new_tokens: int = 32,
    device: str = "cpu",
    out: str | None = None,
    pack: bool = True,
    model: str | None = None,
    cuda_graphs: str = "off",
) -> dict[str, Any]:
    """Measure and print the figures; returns them as a dict. `model` (a folder, hub id or
    'default', the shipped model) replaces the preset's random weights; `batch`: one or more
    batched decode sizes (batch 1 is always measured); `pack`: on the CPU, the linear weights
    prepacked for oneDNN as `cogvlm.load` does (`cogvlm.loading.packing`); `cuda_graphs`: a key of
    GRAPH_MODES (other than "off" only on CUDA)."""
    batches = [batch] if isinstance(batch, int) else list(batch)
    if any(n < 1 for n in batches) or new_tokens < 2:
        raise SettingsError(f"batch sizes must be >= 1 and new_tokens >= 2 (got {batches}, {new_tokens})")
    if cuda_graphs not in GRAPH_MODES:
        raise SettingsError(f"cuda_graphs must be one of {', '.join(GRAPH_MODES)} (got {cuda_graphs!r})")
    if cuda_graphs != "off" and torch.device(device).type != "cuda":
        raise SettingsError(f"CUDA graphs need a CUDA device (got {device})")
    torch_dtype = resolve_dtype(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            torch.manual_seed(0)
            net = CogVLMForCausalLM(get_preset(preset or "tiny")).init_weights().to(torch_dtype).eval()
            net.save_pretrained(tmp)
            folder = Path(tmp)
        else:
            folder = resolve_folder(None if model == "default" else model)
            net = load_model(folder, dtype=torch_dtype, device=device, model_class=CogVLMForCausalLM).eval()
        figures = _header(net, model or preset or "tiny", device) | _load_figures(folder, net, torch_dtype)
    figures |= _speed_figures(net.to(device), batches, new_tokens, device, pack, GRAPH_MODES[cuda_graphs])
    width = max(map(len, figures))
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    if out:
        atomic_write_text(Path(out), json.dumps(figures, indent=2) + "\n")
    return figures


def _weight_bytes(model: CogVLMForCausalLM) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _header(model: CogVLMForCausalLM, name: str, device: str) -> dict[str, Any]:
    return {
        "model": name,
        "dtype": str(model.dtype).replace("torch.", ""),
        "device": device,
        "threads": torch.get_num_threads(),
        "weight_MB": round(_weight_bytes(model) / 1e6, 1),
    }


def _load_figures(folder: Path, model: CogVLMForCausalLM, dtype: torch.dtype) -> dict[str, Any]:
    """Load time and RSS of loading `folder` in `dtype` in a fresh process."""
    probe = subprocess.run(
        [sys.executable, "-c", _LOAD_PROBE, str(folder), str(dtype).replace("torch.", "")],
        capture_output=True,
        text=True,
        check=True,
    )
    seconds, base, loaded, touched = (float(v) for v in probe.stdout.split())
    weight_bytes = _weight_bytes(model)
    return {
        "load_s": round(seconds, 3),
        "load_peak_rss_MB": round(loaded / 1e6, 1),
        "load_rss_growth_over_weights": round((loaded - base) / weight_bytes, 3),
        "rss_growth_after_reading_weights": round((touched - base) / weight_bytes, 3),
    }


def _speed_figures(
    model: CogVLMForCausalLM,
    batches: Sequence[int],
    new_tokens: int,
    device: str,
    pack: bool,
    graph_modes: Sequence[bool],
) -> dict[str, Any]:
    """Vision encode, time to first token, decode at batch 1 and each of `batches` in each graph
    mode, the KV cache and the roofline."""
    config, dtype, kind = model.config, model.dtype, torch.device(device).type
    cuda = kind == "cuda"
    weight_read = _decode_bytes(model, 0, 1)  # counted before packing: packed weights are not parameters
    result: dict[str, Any] = {"packed_linears": pack_linears(model) if pack and kind == "cpu" else 0}
    tok = _DigitTokenizer()
    size = config.vision_config.image_size

    def request(i: int) -> dict[str, Any]:
        return build_conversation_input_ids(
            tok, config, query=f"Describe image {i}.", images=[_random_image(i, size)], template_version="chat"
        )

    with torch.no_grad():
        pixels = request(0)["images"][0][None].to(device, dtype)
        model.model.encode_images(pixels)
        result["vision_encode_s_per_image"] = round(
            min(_timed(lambda: model.model.encode_images(pixels)) for _ in range(3)), 4
        )

    def run(n: int, steps: int, graphs: bool) -> tuple[float, float]:
        """(seconds to first token, decode seconds per step) for n image requests."""
        data = collate([request(i) for i in range(n)])
        data["images"] = [[img.to(dtype) for img in imgs] for imgs in data["images"]]
        decoder = BatchDecoder(model, data, [GenerationConfig(max_new_tokens=steps)] * n, None, graphs=graphs)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        stamps = [time.perf_counter() - t0 for _ in decoder]  # each step ends on a read of its tokens
        return stamps[0], (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)

    prompt = len(request(0)["input_ids"])
    context = prompt + new_tokens
    result |= {
        "image_tokens": config.image_tokens,
        "prompt_tokens": prompt,
        "kv_cache_MB_b1": round(_kv_bytes(model, context, 1) / 1e6, 1),
    }
    step1 = 0.0
    for graphs in graph_modes:
        tag = "_graphs" if graphs else ""
        run(1, 2, graphs)  # warm-up (and the graphs' first captures)
        ttft, step1 = run(1, new_tokens, graphs)
        result |= {f"ttft_s{tag}": round(ttft, 4), f"decode_tok_s_b1{tag}": round(1 / step1, 2)}
        if cuda:
            result[f"peak_gpu_MB_b1{tag}"] = round(torch.cuda.max_memory_allocated() / 1e6, 1)
        for n in batches:
            if n == 1:
                continue
            run(n, 2, graphs)  # warm-up at this batch size (its graphs, or the compiled attention's shapes)
            _, step_n = run(n, new_tokens, graphs)
            result |= {
                f"kv_cache_MB_b{n}": round(_kv_bytes(model, context, n) / 1e6, 1),
                f"decode_tok_s_b{n}{tag}": round(n / step_n, 2),
                f"speedup_b{n}_over_b1{tag}": round(step1 * n / step_n, 2),
            }
            if cuda:
                result[f"peak_gpu_MB_b{n}{tag}"] = round(torch.cuda.max_memory_allocated() / 1e6, 1)
    bandwidth = memory_bandwidth(device=device)
    floor = (weight_read + _kv_bytes(model, context, 1)) / bandwidth
    result |= {
        "memory_bandwidth_GB_s": round(bandwidth / 1e9, 2),
        "roofline_step_ms_b1": round(floor * 1e3, 3),
        "decode_step_ms_b1": round(step1 * 1e3, 3),
        "roofline_pct_b1": round(100 * floor / step1, 1),
        "peak_rss_MB": round(_peak_rss() / 1e6, 1),
    }
    return result
