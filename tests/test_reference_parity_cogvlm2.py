"""The official CogVLM2 implementation's own outputs on reference-cogvlm2-tiny, reproduced case by case (fp32).

The fixture is a tiny random `cogvlm2-llama3-chat-19B`: grouped-query attention (4 query heads, 2 KV
heads), a bias on the vision expert's QKV, the stride-2 conv after the ViT, RoPE base 500000.
Tolerances are the fixture's: ids, types, masks, positions and greedy tokens exact; pixels 1e-5;
image features, logits and per-step generation scores 1e-4 (max abs, padding excluded); the stored
argmax a maximum of our row within 2e-4. Forward and generation start from the fixture's own
input ids; only the prompt tests (`test_inputs_exact`, the placeholder and demo-call tests) encode
text with the tokenizer.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cogvlm import CogVLMForCausalLM, load_tokenizer
from cogvlm.generation import KVCache, decode_one_token, prefill
from cogvlm.image import load_image, preprocess
from cogvlm.model.positions import build_position_ids
from cogvlm.prompts import collate, format_prompt

CASES = [
    "chat_img",
    "chat_img_hist",
    "vqa_img",
    "base_img",
    "base_img_hist",
    "chat_text",
    "chat_text_hist",
    "base_text",
    "batch_equal",
    "batch_padded",
    "batch_mixed",
    "batch_text",
]
BATCHES = [name for name in CASES if name.startswith("batch_")]
WITH_IMAGES = [name for name in CASES if name not in ("chat_text", "chat_text_hist", "base_text", "batch_text")]
PAD = 128002  # the pad id and image placeholder of CogVLM2's official code


@pytest.fixture(scope="module")
def tokenizer(cogvlm2_dir):
    return load_tokenizer(cogvlm2_dir)


def _case(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    return {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(name + ".")}


def _images(t: dict[str, torch.Tensor]) -> list[list[torch.Tensor]] | None:
    """The fixture's stacked pixels as the official per-sample lists."""
    if "images" not in t:
        return None
    it = iter(t["images"])
    return [[next(it)] if n else [] for n in t["images_per_sample"].tolist()]


def _inputs(t: dict[str, torch.Tensor]) -> dict:
    return {k: t[k] for k in ("input_ids", "token_type_ids", "attention_mask")} | {"images": _images(t)}


def test_all_cases_listed(cogvlm2_cases):
    assert sorted(cogvlm2_cases) == sorted(CASES)
    assert WITH_IMAGES == [name for name in CASES if cogvlm2_cases[name]["has_images"]]


def test_fixture_is_cogvlm2(cogvlm2_model):
    """The folder's config.json alone makes the CogVLM2 network (the family rule in config.py)."""
    config = cogvlm2_model.config
    assert config.family == "CogVLM2" and config.image_tokens == 6
    assert (config.num_attention_heads, config.num_kv_heads, config.rope_theta) == (4, 2, 500000.0)
    assert config.eos_token_ids == (128001, 128009) and config.pad_token_id == config.image_token_id == PAD
    assert cogvlm2_model.model.vision.conv is not None


@pytest.mark.parametrize("name", CASES)
def test_prompt_text(name, cogvlm2_cases):
    for member in cogvlm2_cases[name]["members"]:
        history = [tuple(h) for h in member["history"]]
        assert format_prompt(member["query"], history, member["template_version"]) == member["prompt"]


@pytest.mark.parametrize("name", CASES)
def test_inputs_exact(name, cogvlm2_model, tokenizer, cogvlm2_dir, cogvlm2_cases, cogvlm2_tensors):
    """build_conversation_input_ids + collate (left padding with 128002) give the official inputs."""
    samples = []
    for member in cogvlm2_cases[name]["members"]:
        images = [Image.open(cogvlm2_dir / "images" / member["image"])] if member["image"] else None
        samples.append(
            cogvlm2_model.build_conversation_input_ids(
                tokenizer,
                query=member["query"],
                history=[tuple(h) for h in member["history"]],
                images=images,
                template_version=member["template_version"],
            )
        )
    batch = collate(samples, pad_token_id=cogvlm2_model.config.pad_token_id)
    t = _case(cogvlm2_tensors, name)
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(batch[key], t[key]), key
    per_sample = t["images_per_sample"].tolist() if name in WITH_IMAGES else [0] * len(samples)
    assert [len(s) for s in batch["images"]] == per_sample


@pytest.mark.parametrize("name", CASES)
def test_positions_exact(name, cogvlm2_tensors):
    t = _case(cogvlm2_tensors, name)
    assert torch.equal(build_position_ids(t["token_type_ids"], t["attention_mask"]), t["position_ids"])


@pytest.mark.parametrize("name", WITH_IMAGES)
def test_pixels(name, cogvlm2_model, cogvlm2_dir, cogvlm2_cases, cogvlm2_tensors):
    size = cogvlm2_model.config.vision_config.image_size
    files = [m["image"] for m in cogvlm2_cases[name]["members"] if m["image"]]
    pixels = torch.stack([preprocess(load_image(cogvlm2_dir / "images" / f), size) for f in files])
    torch.testing.assert_close(pixels, cogvlm2_tensors[f"{name}.images"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_features_and_logits(name, cogvlm2_model, cogvlm2_tensors):
    t = _case(cogvlm2_tensors, name)
    if "images" in t:
        features = cogvlm2_model.model.encode_images(t["images"])
        torch.testing.assert_close(features, t["image_features"], atol=1e-4, rtol=0)
    with torch.no_grad():
        logits = cogvlm2_model(**_inputs(t)).logits  # (B, L, V)
    real = t["attention_mask"].bool()
    vocab = cogvlm2_tensors["vocab_slice"]
    torch.testing.assert_close(logits[..., vocab][real], t["logits_slice"][real], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits.logsumexp(-1)[real], t["logits_lse"][real], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[:, -1], t["logits_last"], atol=1e-4, rtol=0)
    at_official_argmax = logits.gather(-1, t["logits_argmax"][..., None])[..., 0]
    assert bool((at_official_argmax >= logits.amax(-1) - 2e-4)[real].all())


@pytest.mark.parametrize("name", CASES)
def test_greedy_generation(name, cogvlm2_model, cogvlm2_tensors):
    """generate(max_new_tokens=8, pad_token_id=128002) as the official call; no row met an eos there."""
    t = _case(cogvlm2_tensors, name)
    out = cogvlm2_model.generate(**_inputs(t), max_new_tokens=8, pad_token_id=PAD)
    assert torch.equal(out, t["sequences"])


@pytest.mark.parametrize("name", CASES)
def test_generation_scores_through_cache(name, cogvlm2_model, cogvlm2_tensors):
    """The KV-cache path's (KV heads only) per-step logits equal the official `gen_scores`."""
    t = _case(cogvlm2_tensors, name)
    b, length = t["input_ids"].shape
    steps = t["new_tokens"].shape[1]
    vocab = cogvlm2_tensors["vocab_slice"]
    cache = KVCache(cogvlm2_model, b, length + steps)
    assert cache[0][0].shape == (b, 2, length + steps, 16)
    mask = torch.cat((t["attention_mask"], torch.ones(b, steps, dtype=torch.long)), dim=1)
    with torch.no_grad():
        logits, positions = prefill(cogvlm2_model, _inputs(t), cache)
        pos = positions[:, -1]
        for i in range(steps):
            torch.testing.assert_close(logits[:, vocab], t["gen_scores_slice"][i], atol=1e-4, rtol=0)
            torch.testing.assert_close(logits.logsumexp(-1), t["gen_scores_lse"][i], atol=1e-4, rtol=0)
            pos = pos + 1
            logits = decode_one_token(
                cogvlm2_model, t["new_tokens"][:, i], pos, mask[:, : length + i + 1], cache, length + i
            )


@pytest.mark.parametrize("name", BATCHES)
def test_batch_rows_equal_each_member_alone(name, cogvlm2_model, cogvlm2_tensors):
    """A left-padded row (mixed image and text-only included) gives what its member gives alone."""
    t = _case(cogvlm2_tensors, name)
    images = _images(t) or [[] for _ in range(t["input_ids"].shape[0])]
    with torch.no_grad():
        batched = cogvlm2_model(**_inputs(t)).logits
    for row, real in enumerate(t["attention_mask"].bool()):
        alone = {k: t[k][row][real][None] for k in ("input_ids", "token_type_ids", "attention_mask")}
        alone["images"] = [images[row]]
        with torch.no_grad():
            logits = cogvlm2_model(**alone).logits[0]
        torch.testing.assert_close(batched[row][real], logits, atol=1e-4, rtol=0)
        tokens = cogvlm2_model.generate(**alone, max_new_tokens=8, pad_token_id=PAD)[0, -8:]
        assert torch.equal(tokens, t["new_tokens"][row])


def test_full_forward_equals_prefill_plus_decode(cogvlm2_model, cogvlm2_tensors):
    """[bos, text, image span, text] then 4 cached steps: the image sits mid-prompt, so the experts'
    routing and the grouped KV cache both meet image and text tokens."""
    n = cogvlm2_model.config.image_tokens
    ids = torch.tensor([[128000, 45, 67, 89] + [PAD] * n + [120, 33, 250, 17, 99]])
    types = torch.tensor([[0, 0, 0, 0] + [1] * n + [0] * 5])
    images = [[cogvlm2_tensors["chat_img.images"][0]]]
    new = torch.tensor([[5, 300, 42, 7]])
    full_ids = torch.cat((ids, new), dim=1)
    full_types = torch.cat((types, torch.zeros_like(new)), dim=1)
    length = ids.shape[1]
    with torch.no_grad():
        full = cogvlm2_model(input_ids=full_ids, token_type_ids=full_types, images=images).logits
        cache = KVCache(cogvlm2_model, 1, full_ids.shape[1])
        batch = {"input_ids": ids, "token_type_ids": types, "attention_mask": torch.ones_like(ids), "images": images}
        logits, positions = prefill(cogvlm2_model, batch, cache)
        torch.testing.assert_close(logits, full[:, length - 1], atol=1e-5, rtol=0)
        expected_pos = build_position_ids(full_types)
        pos = positions[:, -1]
        for i in range(new.shape[1]):
            pos = pos + 1
            assert int(pos) == int(expected_pos[0, length + i])
            logits = decode_one_token(
                cogvlm2_model, new[:, i], pos, torch.ones(1, length + i + 1, dtype=torch.long), cache, length + i
            )
            torch.testing.assert_close(logits, full[:, length + i], atol=1e-5, rtol=0)


def test_generation_stops_at_any_eos_id(cogvlm2_model, cogvlm2_tensors, monkeypatch):
    """Without eos_token_id, every id of config.eos_token_ids ends a row (here the second one)."""
    t = _case(cogvlm2_tensors, "chat_img")
    third = int(t["new_tokens"][0, 2])
    monkeypatch.setattr(cogvlm2_model, "config", cogvlm2_model.config.replace(eos_token_ids=(128001, third)))
    out = cogvlm2_model.generate(**_inputs(t), max_new_tokens=8, pad_token_id=PAD)
    assert torch.equal(out[0, t["input_ids"].shape[1] :], t["new_tokens"][0, :3])


class _NoPadTokenizer:
    """The fixture's tokenizer without a pad token, as a Llama-3 tokenizer from transformers comes."""

    def __init__(self, tokenizer) -> None:
        self.bos_token_id, self.pad_token_id, self.encode = tokenizer.bos_token_id, None, tokenizer.encode


def test_image_placeholders_are_128002_whatever_the_tokenizer_pads_with(
    cogvlm2_model, tokenizer, cogvlm2_dir, cogvlm2_tensors
):
    image = Image.open(cogvlm2_dir / "images" / "img0.png")
    inputs = cogvlm2_model.build_conversation_input_ids(
        _NoPadTokenizer(tokenizer), query="Describe this image.", images=[image], template_version="chat"
    )
    assert torch.equal(inputs["input_ids"], cogvlm2_tensors["chat_img.input_ids"][0])


def test_official_demo_call(cogvlm2_model, tokenizer, cogvlm2_dir, cogvlm2_cases, cogvlm2_tensors):
    """The official CogVLM2 demo's calls, with only the import changed."""
    member = cogvlm2_cases["chat_img_hist"]["members"][0]
    image = Image.open(cogvlm2_dir / "images" / member["image"]).convert("RGB")
    inputs = cogvlm2_model.build_conversation_input_ids(
        tokenizer, query=member["query"], history=[tuple(h) for h in member["history"]], images=[image]
    )
    inputs = {
        "input_ids": inputs["input_ids"].unsqueeze(0),
        "token_type_ids": inputs["token_type_ids"].unsqueeze(0),
        "attention_mask": inputs["attention_mask"].unsqueeze(0),
        "images": [[inputs["images"][0].to(cogvlm2_model.dtype)]],
    }
    outputs = cogvlm2_model.generate(**inputs, max_new_tokens=8, pad_token_id=PAD)
    assert torch.equal(outputs, cogvlm2_tensors["chat_img_hist.sequences"])


def test_rope_base_when_inv_freq_not_stored(cogvlm2_dir, cogvlm2_tensors, tmp_path):
    """A checkpoint without `rotary_emb.inv_freq` gets it from config.rope_theta (500000 for CogVLM2)."""
    weights = load_file(cogvlm2_dir / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}, tmp_path / "model.safetensors"
    )
    shutil.copyfile(cogvlm2_dir / "config.json", tmp_path / "config.json")
    model = CogVLMForCausalLM.from_pretrained(tmp_path)
    stored = weights["model.layers.0.self_attn.rotary_emb.inv_freq"]
    torch.testing.assert_close(model.model.layers[0].self_attn.rotary_emb.inv_freq, stored, atol=0, rtol=1e-6)
    t = _case(cogvlm2_tensors, "chat_img_hist")
    with torch.no_grad():
        logits = model(**_inputs(t)).logits
    torch.testing.assert_close(logits[:, -1], t["logits_last"], atol=1e-4, rtol=0)
