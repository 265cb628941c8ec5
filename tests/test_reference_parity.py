"""The official implementation's own outputs on reference-tiny, reproduced case by case (fp32).

Tolerances are the fixture's: ids, types, masks, positions and greedy tokens exact; pixels
1e-6; image features, logits and per-step generation scores 1e-4 (max abs, padding excluded).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from cogvlm.model.positions import build_position_ids
from cogvlm.prompts import collate

CASES = [
    "chat_img",
    "chat_img_hist",
    "vqa_img",
    "vqa_img_hist",
    "base_img",
    "base_img_hist",
    "chat_text",
    "vqa_text_hist",
    "base_text_vicuna",
    "batch_equal",
    "batch_padded",
    "batch_mixed",
]


def build_case(model, tokenizer, reference_dir, case: dict) -> dict:
    samples = []
    for member in case["members"]:
        images = [Image.open(reference_dir / "images" / member["image"])] if member.get("image") else None
        samples.append(
            model.build_conversation_input_ids(
                tokenizer,
                query=member["query"],
                history=[tuple(h) for h in member["history"]],
                images=images,
                template_version=member["template_version"],
            )
        )
    return collate(samples, pad_token_id=tokenizer.pad_token_id)


def test_all_cases_listed(reference_cases):
    assert sorted(reference_cases) == sorted(CASES)


@pytest.mark.parametrize("name", CASES)
def test_inputs_exact(name, reference_model, reference_tokenizer, reference_dir, reference_cases, reference_tensors):
    batch = build_case(reference_model, reference_tokenizer, reference_dir, reference_cases[name])
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(batch[key], reference_tensors[f"{name}.{key}"]), key
    expected_pos = reference_tensors[f"{name}.position_ids"]
    assert torch.equal(build_position_ids(batch["token_type_ids"], batch["attention_mask"]), expected_pos)
    images = [img for sample in batch["images"] for img in sample]
    if f"{name}.images" in reference_tensors:
        torch.testing.assert_close(torch.stack(images), reference_tensors[f"{name}.images"], atol=1e-6, rtol=0)
        per_sample = torch.tensor([len(s) for s in batch["images"]])
        assert torch.equal(per_sample, reference_tensors[f"{name}.images_per_sample"])
    else:
        assert not images


@pytest.mark.parametrize("name", CASES)
def test_features_and_logits(name, reference_model, reference_tensors):
    t = {k.split(".", 1)[1]: v for k, v in reference_tensors.items() if k.startswith(name + ".")}
    images = None
    if "images" in t:
        feats = reference_model.model.encode_images(t["images"])
        torch.testing.assert_close(feats, t["image_features"], atol=1e-4, rtol=0)
        it = iter(t["images"])
        images = [[next(it)] if n else [] for n in t["images_per_sample"].tolist()]
    with torch.no_grad():
        logits = reference_model(
            input_ids=t["input_ids"],
            token_type_ids=t["token_type_ids"],
            attention_mask=t["attention_mask"],
            images=images,
        ).logits
    real = t["attention_mask"].bool()
    torch.testing.assert_close(logits[real], t["logits"][real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_greedy_generation(name, reference_model, reference_tensors, reference_cases):
    t = {k.split(".", 1)[1]: v for k, v in reference_tensors.items() if k.startswith(name + ".")}
    images = None
    if "images" in t:
        it = iter(t["images"])
        images = [[next(it)] if n else [] for n in t["images_per_sample"].tolist()]
    n_new = t["new_tokens"].shape[1]
    out = reference_model.generate(
        input_ids=t["input_ids"],
        token_type_ids=t["token_type_ids"],
        attention_mask=t["attention_mask"],
        images=images,
        max_new_tokens=n_new,
        do_sample=False,
    )
    assert torch.equal(out, t["sequences"])
    assert torch.equal(out[:, t["input_ids"].shape[1] :], t["new_tokens"])


def test_decoded_text(reference_tokenizer, reference_tensors, reference_cases):
    for name, case in reference_cases.items():
        new = reference_tensors[f"{name}.new_tokens"]
        for row, expected in zip(new, case["decoded_new"]):
            assert reference_tokenizer.decode(row) == expected, name


@pytest.mark.parametrize("name", CASES)
def test_generation_scores_through_cache(name, reference_model, reference_tensors):
    """The KV-cache path's per-step logits equal the official `gen_scores`."""
    from cogvlm.generation import KVCache, decode_one_token, prefill

    t = {k.split(".", 1)[1]: v for k, v in reference_tensors.items() if k.startswith(name + ".")}
    images = None
    if "images" in t:
        it = iter(t["images"])
        images = [[next(it)] if n else [] for n in t["images_per_sample"].tolist()]
    b, length = t["input_ids"].shape
    steps = t["new_tokens"].shape[1]
    cache = KVCache(reference_model, b, length + steps)
    batch = {k: t[k] for k in ("input_ids", "token_type_ids", "attention_mask")} | {"images": images}
    with torch.no_grad():
        logits, positions = prefill(reference_model, batch, cache)
        mask = torch.cat((t["attention_mask"], torch.ones(b, steps, dtype=torch.long)), dim=1)
        pos = positions[:, -1]
        for i in range(steps):
            torch.testing.assert_close(logits, t["gen_scores"][i], atol=1e-4, rtol=0)
            pos = pos + 1
            logits = decode_one_token(
                reference_model, t["new_tokens"][:, i], pos, mask[:, : length + i + 1], cache, length + i
            )
