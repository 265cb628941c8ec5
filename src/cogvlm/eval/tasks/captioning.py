"""Captioning: COCO (Karpathy test), Flickr30k (Karpathy test), NoCaps (val), TextCaps (val).

Prompt: the `base` template with "A suitable caption for this image would be:", 64 new tokens,
cut to the first sentence (`clean_caption`). Scores over the whole split through pycocoevalcap
(`caption_scores`); NoCaps also gets CIDEr per domain. The paper's captioning numbers come from
checkpoints fine-tuned on each dataset: a chat model zero-shot scores lower.

Decoding is greedy (`NUM_BEAMS` 1), as the official evaluation script decodes (THUDM/CogVLM
finetune_demo/evaluate_cogvlm_demo.py: top-k 1; its 5-beam strategy is commented out). Beam
search is the task's `num_beams`: `dataclasses.replace(task, num_beams=5)`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ..metrics.caption import caption_scores, clean_caption
from . import Item, Paper, Task, layout, read_json

CAPTION_PROMPT = "A suitable caption for this image would be:"
NUM_BEAMS = 1  # greedy, as the official evaluation
Loader = Callable[[Path, str], Iterator[Item]]


def _karpathy(filename: str, default_folder: str) -> Loader:
    """Loader of a Karpathy split file: images[] with split, filename, sentences[].raw and, for
    COCO, filepath (the image folder) and cocoid."""

    def load(data: Path, split: str) -> Iterator[Item]:
        path = data / filename
        with layout(path):
            for image in read_json(path)["images"]:
                if image["split"] != split:
                    continue
                yield Item(
                    id=str(image.get("cocoid", image["imgid"])),
                    image=data / image.get("filepath", default_folder) / image["filename"],
                    query=CAPTION_PROMPT,
                    target=[s["raw"] for s in image["sentences"]],
                )

    return load


def load_nocaps(data: Path, split: str) -> Iterator[Item]:
    """nocaps_{split}_4500_captions.json (COCO format with a domain per image); images in images/."""
    path = data / f"nocaps_{split}_4500_captions.json"
    content = read_json(path)
    with layout(path):
        references: dict[int, list[str]] = defaultdict(list)
        for ann in content["annotations"]:
            references[ann["image_id"]].append(ann["caption"])
        for image in content["images"]:
            yield Item(
                id=str(image["id"]),
                image=data / "images" / image["file_name"],
                query=CAPTION_PROMPT,
                target=references[image["id"]],
                kind=image.get("domain", ""),
            )


def load_textcaps(data: Path, split: str) -> Iterator[Item]:
    """TextCaps_0.1_{split}.json (one entry per caption); images in train_images/{image_id}.jpg."""
    path = data / f"TextCaps_0.1_{split}.json"
    with layout(path):
        references: dict[str, list[str]] = {}
        for entry in read_json(path)["data"]:
            refs = references.setdefault(entry["image_id"], [])
            if "reference_strs" in entry:
                refs[:] = entry["reference_strs"]
            elif entry["caption_str"] not in refs:
                refs.append(entry["caption_str"])
        for image_id, refs in references.items():
            yield Item(
                id=str(image_id), image=data / "train_images" / f"{image_id}.jpg", query=CAPTION_PROMPT, target=refs
            )


def corpus_scores(items: Sequence[Item], captions: Sequence[str]) -> tuple[dict[str, float], dict[str, float]]:
    """(BLEU-4, ROUGE-L, CIDEr, METEOR over all images; CIDEr of each domain where items have one)."""
    predictions = {i.id: c for i, c in zip(items, captions)}
    references = {i.id: list(i.target) for i in items}
    per_domain = {}
    for domain in sorted({i.kind for i in items if i.kind}):
        ids = [i.id for i in items if i.kind == domain]
        per_domain[domain] = caption_scores(
            {k: predictions[k] for k in ids}, {k: references[k] for k in ids}, meteor=False
        )["CIDEr"]
    return caption_scores(predictions, references), per_domain


def _task(name: str, splits: tuple[str, ...], load: Loader, files: str, paper: tuple[Paper, ...] = ()) -> Task:
    return Task(
        name=name,
        splits=splits,
        metric="CIDEr",
        template="base",
        prompt=CAPTION_PROMPT,
        max_new_tokens=64,
        load=load,
        clean=clean_caption,
        corpus=corpus_scores,
        paper=paper,
        files=files,
        num_beams=NUM_BEAMS,
    )


TASKS = (
    _task(
        "coco-caption",
        ("test", "val"),
        _karpathy("dataset_coco.json", "val2014"),
        "dataset_coco.json (Karpathy), {filepath}/{filename} images (val2014/)",
        paper=(Paper("test", 148.7, "base, fine-tuned on COCO"),),
    ),
    _task(
        "nocaps",
        ("val",),
        load_nocaps,
        "nocaps_val_4500_captions.json, images/{file_name}",
        paper=(Paper("val", 128.3, "base, zero-shot; out-of-domain 132.6"),),
    ),
    _task(
        "flickr30k",
        ("test", "val"),
        _karpathy("dataset_flickr30k.json", "flickr30k-images"),
        "dataset_flickr30k.json (Karpathy), flickr30k-images/{filename}",
        paper=(Paper("test", 94.9, "base, zero-shot"),),
    ),
    _task(
        "textcaps",
        ("val",),
        load_textcaps,
        "TextCaps_0.1_val.json, train_images/{image_id}.jpg",
        paper=(Paper("test", 144.9, "base, fine-tuned on TextCaps; the test split, scored on EvalAI"),),
    ),
)
