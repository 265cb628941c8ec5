"""Quality, memory and speed of each precision and quantisation of one model, as a Markdown table.

    python benchmarks/quant_quality.py FOLDER_OR_PRESET [--shapes N] [--write benchmarks/RESULTS.md]

Settings: fp32, bf16, fp16 (everything in that dtype) and int8, int4 (and nf4 with --settings):
weight-only quantisation of the language model, activations and the rest in --qdtype (float32,
the CPU default). Columns:
- shapes: `cogvlm eval shapes` accuracy, N questions per type (--shapes; needs the folder's tokenizer);
- max |d| vs fp32: the largest logit difference to the fp32 model over --prompts image prompts;
- parity: the largest logit difference of reference-tiny in the same setting to the official
  fp32 logits of its 12 fixture cases (the fixture is the anchor for every model);
- weights: bytes the loaded tensors hold (packed data and scales for quantised ones);
- load / peak RSS: growth of the peak resident memory (VmHWM) of a fresh process over its
  imports, after `load_model` and after one image prompt's forward;
- tok/s: greedy decoding at batch 1 after an image prompt, --tokens steps.
A preset name first saves a random model of that preset in bfloat16 (as the released
checkpoints are stored) to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from cogvlm.bench import _DigitTokenizer, _random_image
from cogvlm.config import PRESETS
from cogvlm.generation import BatchDecoder, GenerationConfig
from cogvlm.loading import load_model
from cogvlm.loading.quantize import storage_bytes
from cogvlm.model import CogVLMForCausalLM
from cogvlm.prompts import build_conversation_input_ids, collate
from cogvlm.tokenizer import load_tokenizer

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reference-tiny"
SETTINGS = {
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "fp16": {"dtype": "float16"},
    "int8": {"quantize": "int8"},
    "int4": {"quantize": "int4"},
    "nf4": {"quantize": "nf4"},
}

_PROBE = r"""
import json, re, sys, time
import torch
from cogvlm.loading.quantize import quiet_logs
from cogvlm.loading import load_model

def peak():  # bytes: the process's peak resident set so far (Linux)
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

folder, kwargs, batch = sys.argv[1], json.loads(sys.argv[2]), torch.load(sys.argv[3])
with quiet_logs("torchao", "torch.utils._pytree"):  # the same imports for every setting
    import cogvlm.loading.placement, torchao.quantization, torchao.prototype.quantization.int4
base = peak()
t0 = time.perf_counter()
model = load_model(folder, **kwargs)
seconds, loaded = time.perf_counter() - t0, peak()
with torch.no_grad():
    model(**batch, logits_to_keep=1)
print(json.dumps({"load_s": seconds, "load_rss": loaded - base, "peak_rss": peak() - base}))
"""


def prompts(folder: Path, model: CogVLMForCausalLM, n: int) -> list[dict[str, Any]]:
    """n one-image chat prompts, with the folder's tokenizer (or a digit one for random models)."""
    has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.model", "tokenizer.json"))
    tokenizer = load_tokenizer(folder) if has_tokenizer else _DigitTokenizer()
    size = model.config.vision_config.image_size
    return [
        collate(
            [
                build_conversation_input_ids(
                    tokenizer,
                    model.config,
                    query=f"What is in picture {i}?",
                    images=[_random_image(i, size)],
                    template_version="chat",
                )
            ]
        )
        for i in range(n)
    ]


def logits(model: CogVLMForCausalLM, batch: dict[str, Any]) -> torch.Tensor:
    images = [[img.to(model.dtype) for img in sample] for sample in batch["images"]]
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"],
            token_type_ids=batch["token_type_ids"],
            attention_mask=batch["attention_mask"],
            images=images,
        ).logits
    return out[batch["attention_mask"].bool()]


def reference_parity(kwargs: dict[str, Any]) -> float:
    """Largest |logit - official fp32 logit| of reference-tiny in this setting over its 12 cases."""
    tensors = load_file(REFERENCE / "cases.safetensors")
    model = load_model(REFERENCE, **kwargs)
    worst = 0.0
    for name in sorted({k.split(".", 1)[0] for k in tensors}):
        t = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(name + ".")}
        it = iter(t.get("images", []))
        images = [[next(it)] if n else [] for n in t["images_per_sample"].tolist()] if "images" in t else None
        batch = {
            "input_ids": t["input_ids"],
            "token_type_ids": t["token_type_ids"],
            "attention_mask": t["attention_mask"],
            "images": images or [[] for _ in t["input_ids"]],
        }
        got = logits(model, batch)
        worst = max(worst, float((got - t["logits"][t["attention_mask"].bool()]).abs().max()))
    return worst


def decode_speed(model: CogVLMForCausalLM, batch: dict[str, Any], tokens: int) -> float:
    """Greedy decode steps per second at batch 1, the prefill and two warm-up steps excluded."""
    batch = {**batch, "images": [[img.to(model.dtype) for img in s] for s in batch["images"]]}
    decoder = BatchDecoder(model, batch, [GenerationConfig(max_new_tokens=tokens + 3)], eos_token_id=None)
    stamps = [time.perf_counter() for _ in decoder][2:]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def probe(folder: Path, kwargs: dict[str, Any], batch: dict[str, Any]) -> dict[str, float]:
    with tempfile.NamedTemporaryFile(suffix=".pt") as f:
        torch.save(
            {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
            | {
                "images": [
                    [img.to(getattr(torch, kwargs.get("dtype", "float32"))) for img in s] for s in batch["images"]
                ]
            },
            f.name,
        )
        out = subprocess.run(
            [sys.executable, "-c", _PROBE, str(folder), json.dumps(kwargs), f.name],
            capture_output=True,
            text=True,
            check=True,
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(folder: Path, names: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    fp32 = load_model(folder, dtype="float32")
    batches = prompts(folder, fp32, args.prompts)
    want = [logits(fp32, b) for b in batches]
    del fp32
    rows = []
    for name in names:
        kwargs = {"dtype": args.qdtype, **SETTINGS[name]}
        model = load_model(folder, **kwargs)
        row = {
            "setting": name,
            "compute": kwargs["dtype"],
            "max_diff": max(float((logits(model, b).float() - w).abs().max()) for b, w in zip(batches, want)),
            "parity": reference_parity(kwargs),
            "weights_MiB": sum(storage_bytes(t) for t in model.state_dict().values()) / 2**20,
            "tok_s": decode_speed(model, batches[0], args.tokens),
        }
        if args.shapes:
            from cogvlm.eval import evaluate_shapes
            from cogvlm.pipeline import Pipeline

            result = evaluate_shapes(Pipeline(model, load_tokenizer(folder)), args.shapes)
            row["shapes"] = result["scores"]["accuracy"]
        del model
        rows.append(row | probe(folder, kwargs, batches[0]))
        print(f"{name}: {rows[-1]}", file=sys.stderr)
    return rows


def table(rows: list[dict[str, Any]], source: str, args: argparse.Namespace) -> str:
    lines = [
        f"Model: {source}; {args.prompts} image prompts, {args.tokens} decode steps, "
        f"{torch.get_num_threads()} threads; `python benchmarks/quant_quality.py {' '.join(sys.argv[1:])}`",
        "",
        "| setting | compute | shapes acc. | max abs logit diff vs fp32 | parity (reference-tiny) "
        "| weights MiB | load RSS MiB | peak RSS MiB | load s | decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        shapes = f"{100 * r['shapes']:.1f} %" if "shapes" in r else "-"
        lines.append(
            f"| {r['setting']} | {r['compute']} | {shapes} | {r['max_diff']:.4f} | {r['parity']:.4f} "
            f"| {r['weights_MiB']:.1f} | {r['load_rss'] / 2**20:.0f} | {r['peak_rss'] / 2**20:.0f} "
            f"| {r['load_s']:.2f} | {r['tok_s']:.1f} |"
        )
    return "\n".join(lines)


def write_section(path: Path, text: str, model: str) -> None:
    """Replace this script's section for `model` in `path` (between its markers), or append one."""
    begin, end = f"<!-- quant_quality {model} -->", f"<!-- /quant_quality {model} -->"
    old = path.read_text() if path.is_file() else ""
    section = f"{begin}\n{text}\n{end}"
    if begin in old and end in old:
        new = old[: old.index(begin)] + section + old[old.index(end) + len(end) :]
    else:
        new = old + ("\n" if old else "") + section + "\n"
    path.write_text(new)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="model folder or preset name")
    p.add_argument("--settings", default="fp32,bf16,fp16,int8,int4", help=f"of {', '.join(SETTINGS)}")
    p.add_argument("--qdtype", default="float32", help="compute dtype of the quantised settings")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--shapes", type=int, default=0, help="shapes questions per type (0: skip)")
    p.add_argument("--write", type=Path, help="put the table in this Markdown file's section")
    args = p.parse_args()
    names = args.settings.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        folder, source = Path(args.model), args.model
        if args.model in PRESETS:
            torch.manual_seed(0)
            CogVLMForCausalLM(PRESETS[args.model]).init_weights().to(torch.bfloat16).save_pretrained(tmp)
            folder, source = Path(tmp), f"random `{args.model}` preset, stored in bfloat16"
        text = table(measure(folder, names, args), source, args)
    print(text)
    if args.write:
        write_section(args.write, text, args.model)


if __name__ == "__main__":
    main()
