"""The training loop, on accelerate: `run(config, overrides)` and the `cogvlm train` command.

One optimizer step = `grad_accum` micro-batches of `batch_size` per process. The loss is the
sum of token losses over the whole step (all micro-batches, all processes) divided by its
number of target tokens, so W processes with batch B give the same update as one with B * W
(objective `patches`, see `patches`: patch losses over the number of patches).
Then, in order: evaluation (every `eval_every`; never touches the training RNG stream), one
line in metrics.jsonl, a checkpoint (every `save_every`, and at the end). Outputs in output_dir:
train_config.yaml, metrics.jsonl, loss.png, checkpoints/step-N (see `checkpoint`), and for LoRA
from scratch the frozen base model in base/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import CogVLMConfig
from ..cpu import bf16_arithmetic
from ..loading import resolve_folder
from ..loading.resolve import resolve_tokenizer
from ..tokenizer import copy_tokenizer_files, load_tokenizer
from .checkpoint import latest_checkpoint, load_checkpoint, register_hooks, resolve_resume, save_checkpoint
from .config import TrainConfig, TrainError, load_config, save_config
from .data import IGNORE_INDEX, MicroBatchSampler, build_dataset, collate
from .modes import build_model, param_groups
from .patches import PatchDataset, PatchProbe, patch_loss_sum, patch_model

logger = logging.getLogger("cogvlm.train")


@dataclass
class EvalContext:
    """What an evaluator gets: `model` as prepared (call it for losses; in eval mode, no grad),
    `unwrapped` (for `generate`), and the rest of the run. Every process calls every evaluator;
    only the main process's results are logged."""

    model: nn.Module
    unwrapped: nn.Module
    accelerator: Accelerator
    tokenizer: Any
    model_config: CogVLMConfig
    step: int


Evaluator = Callable[[EvalContext], dict[str, float]]


# ----------------------------------------------------------------------------- setup
def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_mixed_precision(requested: str, device: torch.device) -> str:
    """The autocast mode to use: the requested one where the device computes in it, else 'no'. On a
    CPU without bf16 arithmetic (AVX2 only) bf16 autocast runs PyTorch's generic loops: a tiny-shapes
    step took 86 s there against 6 s in float32."""
    if requested == "fp16" and device.type == "cpu":
        why = "the CPU has no fp16 autocast"
    elif requested == "bf16" and device.type == "cpu" and not bf16_arithmetic():
        why = "this CPU has no bf16 arithmetic (AVX-512 BF16 or AVX-NE-CONVERT), so bf16 would run far slower"
    elif requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        why = "this GPU has no bf16"
    else:
        return requested
    logger.warning("mixed_precision %s on %s: training in float32 (%s)", requested, device, why)
    return "no"


# ----------------------------------------------------------------------------- steps
def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def loss_sum(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled tokens of a batch (fp32 scalar)."""
    out = model(
        input_ids=batch["input_ids"],
        token_type_ids=batch["token_type_ids"],
        attention_mask=batch["attention_mask"],
        images=batch["images"],
    )
    return F.cross_entropy(
        out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


@dataclass(frozen=True)
class Objective:
    """What a step minimises: `loss_sum` of each micro-batch, divided by the step's `targets`
    (summed over micro-batches and processes); `tokens` is what tokens/s counts."""

    loss_sum: Callable[[nn.Module, dict[str, Any]], torch.Tensor]
    targets: Callable[[dict[str, Any]], int]
    tokens: Callable[[dict[str, Any]], int]


OBJECTIVES = {
    "lm": Objective(
        loss_sum, lambda b: int((b["labels"][:, 1:] != IGNORE_INDEX).sum()), lambda b: int(b["attention_mask"].sum())
    ),
    "patches": Objective(patch_loss_sum, lambda b: b["kind"].numel(), lambda b: b["kind"].numel()),
}


def train_step(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    micro_batches: Sequence[dict[str, Any]],
    max_grad_norm: float,
    objective: Objective = OBJECTIVES["lm"],
) -> dict[str, float]:
    """One optimizer step over this process's micro-batches; returns step-wide loss and counts."""
    device = accelerator.device
    micro_batches = [_to_device(b, device) for b in micro_batches]
    local = torch.tensor(
        [sum(objective.targets(b) for b in micro_batches), sum(objective.tokens(b) for b in micro_batches)],
        device=device,
    )
    targets, tokens = accelerator.reduce(local, "sum").tolist()
    # DDP averages over processes and accelerator.backward divides by grad_accum: undo both.
    scale = accelerator.num_processes * accelerator.gradient_accumulation_steps / max(targets, 1)
    lr_scale = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["initial_lr"]
    total = torch.zeros((), device=device)
    grad_norm = None
    for batch in micro_batches:
        with accelerator.accumulate(model):
            loss = objective.loss_sum(model, batch)
            accelerator.backward(loss * scale)
            total += loss.detach()
            if accelerator.sync_gradients and max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
    if not optimizer.step_was_skipped:  # fp16: a step the grad scaler skipped does not count
        scheduler.step()
    out = {"loss": float(accelerator.reduce(total, "sum")) / max(targets, 1), "lr_scale": lr_scale, "tokens": tokens}
    if grad_norm is not None:
        out["grad_norm"] = float(grad_norm)
    return out


# ----------------------------------------------------------------------------- evaluation
class ShuffledImagesDiagnostic:
    """Loss on a fixed held-out batch with its true images and with the images rotated between
    samples. Equal losses mean the model ignores the image (as a model trained from scratch
    does at first, answering from the text's priors)."""

    def __init__(self, batch: dict[str, Any]) -> None:
        self.batch = batch
        with_image = [i for i, imgs in enumerate(batch["images"]) if imgs]
        self.shuffled = list(batch["images"])
        for src, dst in zip(with_image, with_image[1:] + with_image[:1]):
            self.shuffled[dst] = batch["images"][src]
        self.targets = max(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()), 1)
        self.informative = len(with_image) > 1

    def __call__(self, ctx: EvalContext) -> dict[str, float]:
        batch = _to_device(self.batch, ctx.accelerator.device)
        true = float(loss_sum(ctx.model, batch)) / self.targets
        if not self.informative:
            return {"eval_loss": true}
        shuffled = float(loss_sum(ctx.model, {**batch, "images": self.shuffled})) / self.targets
        return {"eval_loss": true, "eval_loss_shuffled_images": shuffled, "eval_image_gap": shuffled - true}


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without moving the Python, NumPy or torch random streams of the training."""
    py, npy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(py)
    np.random.set_state(npy)


def evaluate(evaluators: Sequence[Evaluator], ctx: EvalContext) -> dict[str, float]:
    ctx.model.eval()
    try:
        with preserved_rng(), torch.no_grad():
            results: dict[str, float] = {}
            for evaluator in evaluators:
                results.update(evaluator(ctx))
            return results
    finally:
        ctx.model.train()


# ----------------------------------------------------------------------------- reporting
class MetricsLog:
    """metrics.jsonl: one JSON object per logged step. A resumed run drops the lines after its
    checkpoint (they are about to be trained again); a fresh run starts the file anew."""

    def __init__(self, path: Path, resumed_step: int | None, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = [] if resumed_step is None else [r for r in read_metrics(path) if r.get("step", 0) <= resumed_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a line cut short by a kill is ignored."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))


def plot_metrics(metrics: Path, out: Path, size: tuple[int, int] = (800, 480)) -> None:
    """loss.png: the training loss and every eval_*loss* series against the step (Pillow only)."""
    from PIL import Image, ImageDraw

    records = read_metrics(metrics)
    names = ["loss"] + sorted({k for r in records for k in r if k.startswith("eval_") and "loss" in k})
    series = {n: [(r["step"], r[n]) for r in records if isinstance(r.get(n), (int, float))] for n in names}
    points = [p for s in series.values() for p in s]
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 70, 20, size[0] - 20, size[1] - 40
    draw.rectangle((left, top, right, bottom), outline="black")
    if points:
        (x0, x1), (y0, y1) = ((min(v), max(v)) for v in zip(*points))
        sx = (right - left) / max(x1 - x0, 1)
        sy = (bottom - top) / max(y1 - y0, 1e-12)
        for i, (name, values) in enumerate(series.items()):
            colour = _COLOURS[i % len(_COLOURS)]
            xy = [(left + (x - x0) * sx, bottom - (y - y0) * sy) for x, y in values]
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=2)
            elif xy:
                draw.ellipse((xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2), fill=colour)
            draw.text((right - 220, top + 8 + 14 * i), name, fill=colour)
        draw.text((4, top), f"{y1:.4g}", fill="black")
        draw.text((4, bottom - 10), f"{y0:.4g}", fill="black")
        draw.text((left, bottom + 6), f"step {x0}", fill="black")
        draw.text((right - 70, bottom + 6), f"step {x1}", fill="black")
    image.save(out)


# ----------------------------------------------------------------------------- run
def local_model(cfg: TrainConfig) -> TrainConfig:
    """`model` (a folder or hub id) and its tokenizer as local folders, by the loading layer's rules
    (a CogVLM-1 folder without a tokenizer takes lmsys/vicuna-7b-v1.5), so the rest reads files."""
    if cfg.model is None:
        return cfg
    folder = resolve_folder(cfg.model)
    return dataclasses.replace(cfg, model=str(folder), tokenizer=str(resolve_tokenizer(cfg.tokenizer, folder)))


def run(config: dict | str | Path, overrides: dict | None = None, evaluators: Sequence[Evaluator] = ()) -> Path:
    """Train as `config` (+ `overrides`) says; returns the final checkpoint folder.

    `evaluators` run every `eval_every` steps after the built-in image-shuffle diagnostic; their
    results go into metrics.jsonl. Works the same under `accelerate launch` with N processes.
    """
    cfg = load_config(config, overrides)
    if cfg.stages:
        return run_stages(cfg, evaluators)
    cfg = local_model(cfg)
    cpu = cfg.cpu or not torch.accelerator.is_available()
    mixed = resolve_mixed_precision(cfg.mixed_precision, PartialState(cpu=cpu).device)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=mixed, gradient_accumulation_steps=cfg.grad_accum, kwargs_handlers=[ddp]
    )
    try:
        return _train(cfg, accelerator, evaluators)
    finally:  # let a later run in this process choose another mixed precision
        AcceleratorState._reset_state()


def run_stages(cfg: TrainConfig, evaluators: Sequence[Evaluator] = ()) -> Path:
    """Run `cfg.stages` in order; stage k+1 starts from stage k's final checkpoint. With
    `resume`, finished stages return at once and the interrupted one continues."""
    base = {k: v for k, v in cfg.to_dict().items() if k != "stages"}
    final: Path | None = None
    for i, stage in enumerate(cfg.stages, 1):
        if not isinstance(stage, dict):
            raise TrainError(f"stages entry {i}: expected a mapping of keys to override")
        stage = dict(stage)
        name = str(stage.pop("name", f"stage{i}"))
        settings = {**base, **stage, "output_dir": str(Path(cfg.output_dir) / name)}
        if final is not None:
            settings |= {"model": str(final), "model_config": None}
        if settings["resume"] and latest_checkpoint(Path(settings["output_dir"])) is None:
            settings["resume"] = False  # this stage has not started yet
        final = run(settings, evaluators=evaluators)
    return final


def _train(cfg: TrainConfig, accelerator: Accelerator, evaluators: Sequence[Evaluator]) -> Path:
    output_dir, main = Path(cfg.output_dir), accelerator.is_main_process
    resume_from = resolve_resume(cfg.resume, output_dir)
    if resume_from is None and latest_checkpoint(output_dir) is not None:
        raise TrainError(
            f"{output_dir} holds checkpoints of an earlier run: resume it (--resume true) or choose another output_dir"
        )
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "train_config.yaml")
    set_seed(cfg.seed)
    model, model_config = build_model(cfg, accelerator, output_dir)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    patches = cfg.objective == "patches"
    if patches:
        model = patch_model(model, cfg.patch_features)
        dataset = PatchDataset(cfg.data, model_config, cfg.seed)
        collate_fn = torch.utils.data.default_collate
    else:
        dataset = build_dataset(cfg.data, tokenizer, model_config, cfg.max_length, cfg.seed)
        collate_fn = partial(collate, pad_token_id=tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup=cfg.warmup_steps, total=cfg.max_steps, min_ratio=cfg.min_lr_ratio)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped by us: once per optimizer step
    register_hooks(accelerator)

    if cfg.eval_every and patches:  # the given evaluators ask the language model: not trained here
        held_out = PatchDataset(cfg.eval_data or cfg.data, model_config, cfg.seed, heldout=cfg.eval_data is None)
        evaluators = [PatchProbe(collate_fn([held_out[i] for i in range(cfg.eval_batch_size)]))]
    elif cfg.eval_every:
        held_out = build_dataset(
            cfg.eval_data or cfg.data, tokenizer, model_config, cfg.max_length, cfg.seed, heldout=cfg.eval_data is None
        )
        eval_batch = collate_fn([held_out[i] for i in range(cfg.eval_batch_size)])
        evaluators = [ShuffledImagesDiagnostic(eval_batch), *evaluators]
    state = {"step": 0, "micro_step": 0, "elapsed": 0.0}
    if resume_from is not None:
        state = load_checkpoint(accelerator, model, resume_from)
        logger.info("resumed from %s (step %d)", resume_from, state["step"])
    step, micro_step = state["step"], state["micro_step"]
    end = cfg.stop_at or cfg.max_steps
    final = resume_from if resume_from is not None and step >= end else None

    sampler = MicroBatchSampler(micro_step, cfg.batch_size, accelerator.process_index, accelerator.num_processes)
    loader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate_fn, generator=torch.Generator()
    )  # leaves the global RNG alone: exact resume
    log = MetricsLog(output_dir / "metrics.jsonl", step if resume_from is not None else None, enabled=main)
    bar = tqdm(total=end, initial=step, disable=not main, desc="train", dynamic_ncols=True)
    started = time.perf_counter()
    batches = iter(loader)
    while step < end:
        tick = time.perf_counter()
        result = train_step(
            accelerator,
            model,
            optimizer,
            scheduler,
            [next(batches) for _ in range(cfg.grad_accum)],
            cfg.max_grad_norm,
            OBJECTIVES[cfg.objective],
        )
        step, micro_step = step + 1, micro_step + cfg.grad_accum
        elapsed = state["elapsed"] + time.perf_counter() - started
        record = {
            "step": step,
            "loss": result["loss"],
            "lr": cfg.lr * result["lr_scale"],
            "tokens_per_s": result["tokens"] / max(time.perf_counter() - tick, 1e-9),
            "elapsed": elapsed,
        }
        if "grad_norm" in result:
            record["grad_norm"] = result["grad_norm"]
        evaluated = bool(evaluators) and cfg.eval_every > 0 and step % cfg.eval_every == 0
        if evaluated:
            record.update(
                evaluate(
                    evaluators,
                    EvalContext(model, accelerator.unwrap_model(model), accelerator, tokenizer, model_config, step),
                )
            )
        if evaluated or step % cfg.log_every == 0 or step == end:
            log.write(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
        if (cfg.save_every and step % cfg.save_every == 0) or step == end:
            final = save_checkpoint(
                accelerator,
                model,
                output_dir,
                step,
                {"micro_step": micro_step, "elapsed": elapsed, "mode": cfg.mode},
                cfg.keep_last,
                cfg.save_shard_size,
            )
    bar.close()
    del batches  # stops DataLoader workers
    if main:
        plot_metrics(output_dir / "metrics.jsonl", output_dir / "loss.png")
        if final is not None and cfg.mode != "lora":  # the final folder loads on its own
            copy_tokenizer_files(cfg.tokenizer or cfg.model, final)
    return final


__all__ = [
    "run",
    "EvalContext",
    "Evaluator",
    "ShuffledImagesDiagnostic",
    "Objective",
    "OBJECTIVES",
    "lr_factor",
    "train_step",
    "loss_sum",
    "MetricsLog",
    "plot_metrics",
]
