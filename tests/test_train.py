"""Tests for cogvlm.train: data and labels, modes, the loop, checkpoints, resume, kill, DDP, CLI.

All runs use the tiny preset (or the reference-tiny checkpoint) and its 600-token tokenizer on
28 px synthetic scenes, on CPU, a few steps each.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cogvlm import PRESETS, CogVLMForCausalLM, synthetic
from cogvlm.cli import main
from cogvlm.prompts import build_conversation_input_ids
from cogvlm.train import checkpoint, data, load_config, loop, run
from cogvlm.train.config import TrainError
from cogvlm.train.loop import MetricsLog, lr_factor, resolve_mixed_precision
from cogvlm.train.modes import PARTS, apply_mode, build_model, matches, param_groups


def train_cli(argv: list[str]) -> int:
    return main(["train", *argv])


ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).parent / "fixtures" / "reference-tiny"
TINY = PRESETS["tiny"]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def losses(output_dir: Path) -> dict[int, float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def config(output_dir: Path, **changes) -> dict:
    """A from-scratch tiny run on in-memory synthetic scenes; `changes` override."""
    return {
        "model_config": "tiny",
        "tokenizer": str(REFERENCE),
        "cpu": True,
        "output_dir": str(output_dir),
        "data": [{"type": "synthetic", "seed": 1, "per_scene": 2}],
        "batch_size": 4,
        "max_steps": 4,
        "lr": 3e-3,
        "save_every": 0,
        "eval_every": 0,
        **changes,
    }


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    """4 records on 2 scenes (base, vqa, chat templates), written as JSONL + PNGs."""
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.write_dataset(out, n=2, seed=3, size=28, per_scene=2)
    return out


# ----------------------------------------------------------------------------- data
def _labelled_spans(example: dict) -> list[list[int]]:
    spans, current = [], []
    for token, label in zip(example["input_ids"].tolist(), example["labels"].tolist()):
        if label != data.IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


@pytest.mark.parametrize("template", ["chat", "vqa"])
def test_labels_cover_exactly_the_assistant_text(reference_tokenizer, template):
    tok = reference_tokenizer
    image = synthetic.make_scene(random.Random(0), 28).render()
    turns = (
        ("What color is the circle?", "red"),
        ("How many shapes are there?", "3"),
        ("Describe the image.", "a large red circle and a blue star."),
    )
    [conv] = data.split_conversation(image, turns, template, "test:1")
    example = data.build_example(conv, tok, TINY, max_length=512)
    spans = _labelled_spans(example)
    assert [tok.decode(s) for s in spans[:-1]] == ["red", "3"]
    assert spans[-1][-1] == tok.eos_token_id and tok.decode(spans[-1][:-1]) == turns[-1][1]
    # The prompt part is exactly the inference prompt for the last turn, history included.
    prompt = build_conversation_input_ids(
        tok, TINY, query=turns[-1][0], history=list(turns[:-1]), images=[image], template_version=template
    )
    n = len(prompt["input_ids"])
    assert torch.equal(example["input_ids"][:n], prompt["input_ids"])
    assert torch.equal(example["token_type_ids"][:n], prompt["token_type_ids"])
    assert (example["token_type_ids"][n:] == 0).all() and (example["labels"][: TINY.image_tokens + 1] == -100).all()


def test_base_template_splits_turns_and_collate_pads_right(reference_tokenizer):
    convs = data.split_conversation(None, (("a?", "x"), ("b?", "yy")), "base", "test:1")
    assert [c.turns for c in convs] == [(("a?", "x"),), (("b?", "yy"),)]
    examples = [data.build_example(c, reference_tokenizer, TINY, 64) for c in convs]
    batch = data.collate(examples, pad_token_id=0)
    short = len(examples[0]["input_ids"])
    assert batch["input_ids"].shape[0] == 2 and batch["images"] == [[], []]
    assert (batch["labels"][0, short:] == -100).all() and (batch["attention_mask"][0, short:] == 0).all()
    assert batch["attention_mask"][0, :short].all()


def test_bad_records_are_reported_once_with_file_and_line_and_skipped(
    dataset_dir, tmp_path, caplog, reference_tokenizer
):
    good = (dataset_dir / "data.jsonl").read_text().splitlines()
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    for name in ("000000.png", "000001.png"):
        (tmp_path / "images" / name).write_bytes((dataset_dir / "images" / name).read_bytes())
    record = json.loads(good[0])
    bad = [
        "{not json",  # line 2
        json.dumps({"image": "images/000000.png"}),  # 3: no conversations
        json.dumps({**record, "image": "images/missing.png"}),  # 4: missing image
        json.dumps({**record, "image": "images/broken.png"}),  # 5: unreadable image
        json.dumps({**record, "conversations": record["conversations"][::-1]}),  # 6: wrong roles
        json.dumps({"conversations": record["conversations"]}),  # 7: no image field
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([good[0], *bad, *good[1:]]) + "\n")
    data._reported.clear()
    with caplog.at_level(logging.WARNING, logger="cogvlm.train"):
        convs = data.read_jsonl(path, None, "chat")
        dataset = data.TrainDataset([data.FiniteSource(convs, 0, "x")], [1.0], reference_tokenizer, TINY, 512, 0)
        examples = [dataset[i] for i in range(3 * len(convs))]  # three epochs
    messages = [r.getMessage() for r in caplog.records]
    assert len(convs) == len(good) + 1 and len(examples) == 3 * len(convs)
    assert all(e["images"] for e in examples)
    for line in (2, 3, 4, 5, 6, 7):
        hits = [m for m in messages if m.startswith(f"{path}:{line}: skipped")]
        assert len(hits) == 1, (line, messages)
    assert len(messages) == 6 and all("\n" not in m for m in messages)
    # A run on this file trains and ends normally.
    out = run(config(tmp_path / "run", data=[{"type": "jsonl", "path": str(path)}], max_steps=2))
    assert (out / "model.safetensors").is_file()


def test_sft311k_layout(tmp_path, caplog):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    image = synthetic.make_scene(random.Random(1), 28).render()
    for name in ("a", "b", "d"):
        image.save(tmp_path / "images" / f"{name}.jpg")
    captions = [
        {"role": "User", "content": "What is it?"},
        {"role": "Assistant", "content": "a star."},
        {"role": "User", "content": "Colour?"},
        {"role": "Assistant", "content": "red"},
    ]
    (tmp_path / "labels" / "a.json").write_text(json.dumps({"captions": captions}))
    (tmp_path / "labels" / "b.json").write_text('{"captions": [\n  oops')
    (tmp_path / "labels" / "c.json").write_text(json.dumps({"captions": captions}))  # no image
    (tmp_path / "labels" / "d.json").write_text(json.dumps({"captions": captions[1:]}))
    data._reported.clear()
    with caplog.at_level(logging.WARNING, logger="cogvlm.train"):
        convs = data.read_sft311k(tmp_path, None, "chat")
    assert [c.turns for c in convs] == [(("What is it?", "a star."), ("Colour?", "red"))]
    assert convs[0].image == tmp_path / "images" / "a.jpg"
    messages = sorted(r.getMessage() for r in caplog.records)
    assert [m.split(": skipped")[0] for m in messages] == [
        f"{tmp_path / 'labels' / 'b.json'}:2",
        str(tmp_path / "labels" / "c.json"),
        str(tmp_path / "labels" / "d.json"),
    ]


@pytest.mark.parametrize("turns", [1, 3])
def test_synthetic_source_is_iter_samples_by_index(turns):
    source = data.SyntheticSource(seed=5, size=28, per_scene=2, turns=turns)
    expected = list(synthetic.iter_samples(5, 3, size=28, per_scene=2, turns=turns))
    assert len(expected) == 6  # every scene gave its 2 records, so index i is the i-th sample
    for i, (image, record) in enumerate(expected):
        conv = source[i]
        texts = [m["content"] for m in record["conversations"]]
        assert conv.turns == tuple(zip(texts[::2], texts[1::2]))
        assert conv.template_version == record["template_version"]
        assert conv.image.tobytes() == image.tobytes()
    assert max(len(source[i].turns) for i in range(6)) == turns


def test_synthetic_min_and_max_shapes_bound_the_scenes():
    def counts(**options):
        source = data.SyntheticSource(seed=4, size=224, per_scene=1, tasks=["caption"], **options)
        return [len(synthetic.parse_caption_objects(source[i].turns[0][1])) for i in range(30)]

    assert min(counts()) == 1 and max(counts()) == 4
    assert min(counts(min_shapes=3)) == 3 and max(counts(min_shapes=3)) == 4
    assert max(counts(max_shapes=2)) == 2 and max(counts(varied=True)) > 2
    assert set(counts(varied=True, max_shapes=1)) == {1}
    with pytest.raises(TrainError, match="min_shapes 5"):
        data.build_source({"type": "synthetic", "min_shapes": 5}, TINY, 0)
    with pytest.raises(TrainError, match="max_shapes 1 .use min_shapes 2 to 4"):
        data.build_source({"type": "synthetic", "min_shapes": 2, "max_shapes": 1}, TINY, 0)


def test_multi_turn_synthetic_example_labels_every_answer(reference_tokenizer):
    conv = next(
        c
        for c in (data.SyntheticSource(seed=2, size=28, per_scene=4, turns=4)[i] for i in range(40))
        if len(c.turns) == 4
    )
    example = data.build_example(conv, reference_tokenizer, TINY, 2048)
    ids = [t for t in example["labels"].tolist() if t != data.IGNORE_INDEX]
    assert ids[-1] == reference_tokenizer.eos_token_id
    assert [a for _, a in conv.turns] == reference_tokenizer.decode(ids[:-1]).split()


def test_micro_batches_do_not_depend_on_the_process_count():
    one = next(iter(data.MicroBatchSampler(3, 4)))
    two = [next(iter(data.MicroBatchSampler(3, 2, rank, 2))) for rank in (0, 1)]
    assert one == two[0] + two[1] == [12, 13, 14, 15]


# ----------------------------------------------------------------------------- modes
def test_parts_partition_the_parameters_and_lr_groups_use_them():
    model = CogVLMForCausalLM(TINY)
    for name, _ in model.named_parameters():
        assert sum(matches(name, patterns) for patterns in PARTS.values()) == 1, name
    cfg = load_config(config(Path("x"), lr=1e-3, weight_decay=0.1, lr_groups=[{"params": ["@language"], "lr": "1e-5"}]))
    groups = param_groups(model, cfg)
    language = {id(p) for n, p in model.named_parameters() if matches(n, PARTS["language"])}
    for group in groups:
        assert group["lr"] == (1e-5 if id(group["params"][0]) in language else 1e-3)
        assert all((id(p) in language) == (group["lr"] == 1e-5) for p in group["params"])
        assert group["weight_decay"] == (0.1 if group["params"][0].ndim >= 2 else 0.0)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_an_lr_of_zero_freezes_its_part():
    model = CogVLMForCausalLM(TINY)
    groups = param_groups(model, load_config(config(Path("x"), lr_groups=[{"params": ["@vit", "@adapter"], "lr": 0}])))
    in_groups = {id(p) for g in groups for p in g["params"]}
    for name, param in model.named_parameters():
        vision = matches(name, PARTS["vit"] + PARTS["adapter"])
        assert param.requires_grad != vision and (id(param) in in_groups) != vision, name
    assert all(g["lr"] > 0 for g in groups)


def test_reinit_redraws_only_the_named_part(tmp_path):
    """reinit [@adapter] on a trained checkpoint: the adapter starts afresh (normal(0, 0.02)
    projections, unit norms), everything else is the checkpoint's."""
    settings = config(tmp_path, model=str(REFERENCE), model_config=None, reinit=["@adapter"])
    model, _ = build_model(load_config(settings), None, tmp_path)
    loaded = load_file(REFERENCE / "model.safetensors")
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), loaded[name]) != matches(name, PARTS["adapter"]), name
    adapter = model.model.vision.linear_proj
    assert abs(float(adapter.gate_proj.weight.std()) - TINY.initializer_range) < 0.002
    assert torch.equal(adapter.norm1.weight, torch.ones_like(adapter.norm1.weight))
    with pytest.raises(TrainError, match=r"reinit \['model.nothing'\]: no parameter matches"):
        build_model(load_config({**settings, "reinit": ["model.nothing"]}), None, tmp_path)


def test_rescale_multiplies_only_the_named_part(tmp_path):
    """rescale {the adapter's last projection: 50}: the image tokens (not boi/eoi) come out 50x the
    checkpoint's, every other weight is unchanged; no match or a bad factor is a one-line error."""
    name = "model.vision.linear_proj.dense_4h_to_h.weight"
    settings = config(tmp_path, model=str(REFERENCE), model_config=None, rescale={name: 50})
    model, _ = build_model(load_config(settings), None, tmp_path)
    loaded = load_file(REFERENCE / "model.safetensors")
    for n, param in model.named_parameters():
        assert torch.equal(param.detach(), loaded[n] * 50 if n == name else loaded[n]), n
    size = model.config.vision_config.image_size
    images = torch.randn(1, 3, size, size)
    plain = CogVLMForCausalLM.from_pretrained(REFERENCE)
    with torch.no_grad():
        scaled, tokens = model.model.encode_images(images), plain.model.encode_images(images)
    torch.testing.assert_close(scaled[:, 1:-1], tokens[:, 1:-1] * 50, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scaled[:, [0, -1]], tokens[:, [0, -1]])
    with pytest.raises(TrainError, match=r"rescale 'model.nothing': no parameter matches"):
        build_model(load_config({**settings, "rescale": {"model.nothing": 2}}), None, tmp_path)
    with pytest.raises(TrainError, match=r"bad training config: rescale .* positive factor"):
        load_config({**settings, "rescale": {name: 0}})


def test_image_size_interpolates_the_position_embeddings(tmp_path):
    """image_size 42 on the 28 px reference-tiny (patch 14): its 2x2 grid of position embeddings
    becomes a bicubic 3x3 (cls kept; the centre is the mean of the four), every other weight is the
    checkpoint's and the model reads 42 px images; a size off the patch grid is a one-line error."""
    settings = config(tmp_path, model=str(REFERENCE), model_config=None, image_size=42)
    model, model_config = build_model(load_config(settings), None, tmp_path)
    assert (model_config.vision_config.image_size, model_config.vision_config.num_positions) == (42, 10)
    key = "model.vision.patch_embedding.position_embedding.weight"
    loaded = load_file(REFERENCE / "model.safetensors")
    for name, tensor in model.state_dict().items():
        assert name == key or torch.equal(tensor, loaded[name]), name
    pos, old = model.state_dict()[key], loaded[key]
    assert pos.shape == (10, old.shape[1]) and torch.equal(pos[0], old[0])
    torch.testing.assert_close(pos[1 + 4], old[1:].mean(0))
    with torch.no_grad():
        assert model.model.encode_images(torch.randn(2, 3, 42, 42)).shape[:2] == (2, 9 + 2)
    with pytest.raises(TrainError, match=r"image_size 40 is not a multiple of the patch size 14"):
        build_model(load_config({**settings, "image_size": 40}), None, tmp_path)
    with pytest.raises(TrainError, match=r"bad training config: image_size 0"):
        load_config({**settings, "image_size": 0})
    with pytest.raises(TrainError, match=r"image_size with mode lora"):
        load_config({**settings, "mode": "lora"})


def test_vision_layers_appends_layers_that_change_nothing_until_trained(tmp_path):
    """vision_layers 4 on the 2-layer reference-tiny: the checkpoint's layers stay where they were,
    two new ones follow with zero sublayer norms, so the image tokens are the checkpoint's to the
    bit; two steps later the new norms have moved (they train) and the checkpoint loads 4 deep.
    Fewer layers than the model has is a one-line error."""
    settings = config(tmp_path, model=str(REFERENCE), model_config=None, vision_layers=4)
    model, model_config = build_model(load_config(settings), None, tmp_path)
    assert model_config.vision_config.num_hidden_layers == 4
    loaded = load_file(REFERENCE / "model.safetensors")
    state = model.state_dict()
    for name, tensor in loaded.items():
        assert torch.equal(state[name], tensor), name
    for i in (2, 3):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            for part in ("weight", "bias"):
                assert not state[f"model.vision.transformer.layers.{i}.{norm}.{part}"].any()
        assert state[f"model.vision.transformer.layers.{i}.mlp.fc1.weight"].std() > 0
    size = model_config.vision_config.image_size
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        grown, plain = (
            model.model.encode_images(images),
            CogVLMForCausalLM.from_pretrained(REFERENCE).model.encode_images(images),
        )
    assert torch.equal(grown, plain)
    trained = CogVLMForCausalLM.from_pretrained(run({**settings, "max_steps": 2}))
    assert trained.config.vision_config.num_hidden_layers == 4
    assert trained.model.vision.transformer.layers[3].post_attention_layernorm.weight.abs().sum() > 0
    with pytest.raises(TrainError, match=r"vision_layers 1 is fewer than the model's 2 ViT layers"):
        build_model(load_config({**settings, "vision_layers": 1}), None, tmp_path)
    with pytest.raises(TrainError, match=r"bad training config: vision_layers 0"):
        load_config({**settings, "vision_layers": 0})


def test_a_resized_run_checkpoints_its_size_and_resumes(tmp_path):
    """Training at image_size 42 from the 28 px checkpoint writes checkpoints that load at 42 px,
    and resuming rebuilds the resized model before reading the checkpoint."""
    settings = config(tmp_path, model=str(REFERENCE), model_config=None, image_size=42, max_steps=2, save_every=1)
    first = run(settings)
    assert CogVLMForCausalLM.from_pretrained(first).config.vision_config.num_positions == 10
    last = run({**settings, "max_steps": 3, "resume": True})
    assert last.name == "step-3" and CogVLMForCausalLM.from_pretrained(last).config.vision_config.image_size == 42


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = [lr_factor(s, warmup=3, total=10, min_ratio=0.1) for s in range(11)]
    assert f[:3] == [0.25, 0.5, 0.75] and f[3] == 1.0
    assert all(a >= b for a, b in zip(f[3:], f[4:])) and f[10] == pytest.approx(0.1)


def test_expert_mode_copies_language_experts_and_trains_only_the_vision_side():
    model = CogVLMForCausalLM.from_pretrained(REFERENCE)
    trained = apply_mode(model, load_config(config(Path("x"), mode="expert")))
    state = trained.state_dict()
    for name, tensor in state.items():
        if "vision_expert_" in name or "vision_mlp" in name:
            twin = name.replace("vision_expert_", "language_expert_").replace("vision_mlp", "language_mlp")
            assert torch.equal(tensor, state[twin]), name
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if matches(n, PARTS["vision_experts"] + PARTS["adapter"])}
    assert trainable == expected and any("linear_proj" in n for n in trainable) and "model.vision.boi" in trainable
    with_vit = apply_mode(CogVLMForCausalLM(TINY), load_config(config(Path("x"), mode="expert", train_vit=True)))
    vit = {n for n, _ in model.named_parameters() if matches(n, PARTS["vit"])}
    assert {n for n, p in with_vit.named_parameters() if p.requires_grad} == expected | vit


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def mode_runs(dataset_dir, tmp_path_factory) -> dict[str, Path]:
    """8 steps per mode on the same 4 examples (batch 4: every step sees all of them)."""
    out = {}
    for mode, lr, model in (("from_scratch", 3e-3, None), ("expert", 3e-3, REFERENCE), ("lora", 1e-2, REFERENCE)):
        folder = tmp_path_factory.mktemp(mode)
        out[mode] = run(
            config(
                folder,
                mode=mode,
                lr=lr,
                max_steps=8,
                min_lr_ratio=1.0,
                model=str(model) if model else None,
                model_config=None if model else "tiny",
                data=[{"type": "jsonl", "path": str(dataset_dir / "data.jsonl")}],
            )
        )
    return out


@pytest.mark.parametrize("mode", ["from_scratch", "expert", "lora"])
def test_each_mode_lowers_the_loss(mode_runs, mode):
    curve = losses(mode_runs[mode].parents[1])
    assert list(curve) == list(range(1, 9))
    assert curve[8] < curve[1] - 0.3, curve


def test_lora_on_a_bf16_base(dataset_dir, tmp_path):
    """model_dtype bfloat16: the frozen base is bf16, the adapters stay fp32, and it learns."""
    settings = config(
        tmp_path,
        mode="lora",
        lr=1e-2,
        max_steps=8,
        min_lr_ratio=1.0,
        model=str(REFERENCE),
        model_config=None,
        model_dtype="bfloat16",
        data=[{"type": "jsonl", "path": str(dataset_dir / "data.jsonl")}],
    )
    model, _ = build_model(load_config(settings), None, tmp_path / "probe")
    dtypes = {p.dtype for n, p in model.named_parameters() if p.requires_grad}
    frozen = {p.dtype for n, p in model.named_parameters() if not p.requires_grad and p.dim() == 2}
    assert dtypes == {torch.float32} and frozen == {torch.bfloat16}
    curve = losses(run(settings).parents[1])
    assert curve[8] < curve[1] - 0.3, curve


def test_expert_run_left_the_language_side_unchanged(mode_runs):
    before, after = load_file(REFERENCE / "model.safetensors"), weights(mode_runs["expert"])
    for name, tensor in after.items():
        frozen = matches(name, PARTS["language"] + PARTS["vit"]) or name.endswith("inv_freq")  # + buffers
        assert torch.equal(tensor, before[name]) == frozen, name


def test_lora_merge_equals_the_unmerged_model(mode_runs, tmp_path, reference_tensors):
    from peft import PeftModel

    ckpt = mode_runs["lora"]
    assert train_cli(["merge", str(ckpt), str(tmp_path / "merged")]) == 0
    merged = CogVLMForCausalLM.from_pretrained(tmp_path / "merged")
    unmerged = PeftModel.from_pretrained(CogVLMForCausalLM.from_pretrained(REFERENCE), str(ckpt)).eval()
    base = CogVLMForCausalLM.from_pretrained(REFERENCE)
    name = "batch_padded"
    inputs = {k: reference_tensors[f"{name}.{k}"] for k in ("input_ids", "token_type_ids", "attention_mask")}
    per_sample = reference_tensors[f"{name}.images_per_sample"].tolist()
    images = iter(reference_tensors[f"{name}.images"])
    inputs["images"] = [[next(images)] if n else [] for n in per_sample]
    with torch.no_grad():
        a, b, c = (m(**inputs).logits for m in (merged, unmerged, base))
    assert (a - b).abs().max() < 1e-5  # fp32: W + BA folded once vs added per call
    assert (a - c).abs().max() > 1e-3  # the adapter did change the model
    assert set(merged.state_dict()) == set(base.state_dict())


def test_resume_continues_exactly(tmp_path):
    """Stopped after step 3 (checkpoint at 2), resumed: bit-identical to an uninterrupted run."""
    settings = dict(
        batch_size=2,
        grad_accum=2,
        warmup_steps=2,
        save_every=2,
        max_steps=4,
        model_config={"preset": "tiny", "vision_config": {"dropout_prob": 0.1}},
    )
    baseline = run(config(tmp_path / "a", **settings))

    class Stop(Exception):
        pass

    def stop_at_3(ctx):
        if ctx.step == 3:
            raise Stop
        return {}

    with pytest.raises(Stop):
        run(config(tmp_path / "b", eval_every=1, **settings), evaluators=[stop_at_3])
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path / "b")] == ["step-2"]
    resumed = run(config(tmp_path / "b", eval_every=1, resume=True, **settings))
    assert resumed.name == "step-4"
    a, b = weights(baseline), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_stop_at_ends_where_the_longer_run_was_on_its_schedule(tmp_path):
    """A stage stopped early is recorded with stop_at: its weights are the full schedule's at that
    step (not a shorter schedule's), and a resumed run that already got there has nothing to do."""
    settings = dict(warmup_steps=1, max_steps=5, lr=1e-2, min_lr_ratio=0.0, log_every=1)
    full = run(config(tmp_path / "full", save_every=3, keep_last=0, **settings))
    stopped = run(config(tmp_path / "stop", stop_at=3, **settings))
    short = run(config(tmp_path / "short", **{**settings, "max_steps": 3}))
    assert stopped.name == "step-3" and (stopped / "tokenizer.model").is_file()
    a, b, c = weights(full.parent / "step-3"), weights(stopped), weights(short)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(c[k], b[k]) for k in c)  # the 3-step schedule decays sooner
    assert run(config(tmp_path / "stop", stop_at=3, resume=True, **settings)) == stopped
    with pytest.raises(TrainError, match="stop_at 6 must be between 1 and max_steps"):
        load_config(config(tmp_path / "bad", stop_at=6, **settings))


_SLOW_SAVE = """
import sys, time
from cogvlm.cli import main
from cogvlm.train import checkpoint
original = checkpoint.save_weights
def slow(model, folder, *args):
    original(model, folder, *args)
    if folder.name == ".tmp-step-4":
        time.sleep(120)  # killed here, mid-save
checkpoint.save_weights = slow
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    settings = dict(save_every=2, max_steps=6)
    (tmp_path / "slow.py").write_text(_SLOW_SAVE)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config(tmp_path / "run", **settings)))
    # Same thread count as this process (conftest: 2), so float sums run in the same order.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "slow.py"), str(tmp_path / "cfg.yaml")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    partial = tmp_path / "run" / "checkpoints" / ".tmp-step-4"
    try:
        deadline = time.monotonic() + 60
        while not (partial / "model.safetensors").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "training ended before the save"
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (partial / checkpoint.STATE_FILE).exists()
    latest = checkpoint.latest_checkpoint(tmp_path / "run")
    assert latest.name == "step-2"
    CogVLMForCausalLM.from_pretrained(latest)  # loads as a model
    resumed = run(config(tmp_path / "run", resume=True, **settings))
    baseline = run(config(tmp_path / "baseline", **settings))
    assert not partial.exists() and resumed.name == "step-6"
    a, b = weights(baseline), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


_LAUNCH = 'import sys\nfrom cogvlm.cli import main\nsys.exit(main(["train", *sys.argv[1:]]))\n'


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    """gloo DDP, batch 2 per process vs one process with batch 4: same samples, same update."""
    settings = dict(max_steps=3, batch_size=4, max_grad_norm=0.5, lr=1e-3)
    single = run(config(tmp_path / "one", **settings))
    (tmp_path / "launch.py").write_text(_LAUNCH)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config(tmp_path / "two", **settings)))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(tmp_path / "launch.py"),
        str(tmp_path / "cfg.yaml"),
        "--batch_size",
        "2",
    ]
    done = subprocess.run(
        command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "two" / "checkpoints" / "step-3" / "random_states_1.pkl").is_file()  # really 2
    a, b = weights(single), weights(tmp_path / "two" / "checkpoints" / "step-3")
    # fp32 sums in another order change gradients by ~1e-7 relative. AdamW divides by sqrt(v) + eps,
    # so a handful of elements whose gradient is float noise (~1e-10) move by up to ~1e-2 * lr
    # = 1e-5 differently. Hence: every element within 3e-5, and the mean difference below 1e-8.
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diffs.max() < 3e-5 and diffs.mean() < 1e-8, (diffs.max(), diffs.mean())
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one.keys() == two.keys() and all(abs(one[s] - two[s]) < 1e-5 for s in one)


# ----------------------------------------------------------------------------- CLI and outputs
def test_metrics_log_on_resume_keeps_earlier_steps_and_survives_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3}\n{"step": 2, "loss": 2}\n{"step": 3, "loss": 1}\n{"step": 4, "lo')
    MetricsLog(path, resumed_step=2).write({"step": 3, "loss": 1.5})
    assert [json.loads(line)["loss"] for line in path.read_text().splitlines()] == [3, 2, 1.5]
    MetricsLog(path, resumed_step=None)
    assert path.read_text() == ""


@pytest.mark.parametrize("arithmetic", [True, False])
def test_bf16_autocast_only_where_the_cpu_computes_in_bf16(monkeypatch, caplog, arithmetic):
    # An AVX2-only CPU runs bf16 products in generic loops (a tiny-shapes step: 86 s against 6 s
    # in float32), so the recipes' `mixed_precision: bf16` falls back there, saying why.
    monkeypatch.setattr(loop, "bf16_arithmetic", lambda: arithmetic)
    with caplog.at_level(logging.WARNING, logger=loop.logger.name):
        mode = resolve_mixed_precision("bf16", torch.device("cpu"))
    assert mode == ("bf16" if arithmetic else "no")
    assert ("no bf16 arithmetic" in caplog.text) is not arithmetic
    assert resolve_mixed_precision("no", torch.device("cpu")) == "no"
    assert resolve_mixed_precision("fp16", torch.device("cpu")) == "no"


def test_cli_trains_with_bf16_checkpointing_eval_and_keep_last(tmp_path):
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config(tmp_path / "ignored")))
    out = tmp_path / "run"
    argv = [
        str(tmp_path / "cfg.yaml"),
        "--output_dir",
        str(out),
        "--max_steps",
        "3",
        "--mixed_precision",
        "bf16",
        "--gradient_checkpointing",
        "--save_every",
        "1",
        "--keep_last",
        "2",
        "--eval_every",
        "2",
        "--lr",
        "1e-3",
        "--num_workers",
        "1",
    ]
    assert train_cli(argv) == 0
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == ["step-2", "step-3"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {"loss", "lr", "tokens_per_s", "elapsed"} <= set(records[0]) and records[0]["lr"] == 1e-3
    assert {"eval_loss", "eval_loss_shuffled_images", "eval_image_gap"} <= set(records[1])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert load_config(out / "train_config.yaml").mixed_precision == "bf16"
    assert CogVLMForCausalLM.from_pretrained(out / "checkpoints" / "step-3").config == TINY
    with pytest.raises(TrainError, match="earlier run"):  # a fresh start never mixes with old checkpoints
        run(config(out))


def test_cli_reports_bad_settings_in_one_line(tmp_path, capsys):
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config(tmp_path / "run")))
    assert train_cli([str(tmp_path / "cfg.yaml"), "--mode", "sideways"]) == 2
    assert train_cli([str(tmp_path / "cfg.yaml"), "--max_steps", "many"]) == 2
    assert train_cli([str(tmp_path / "cfg.yaml"), "--no_such_key", "1"]) == 2
    assert train_cli([str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "mode 'sideways'" in err and "--max_steps: cannot read 'many'" in err and "missing.yaml" in err
    with pytest.raises(TrainError, match="unknown config key"):
        load_config({"lr": 1, "bogus": 2})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"hidden_act": "nope"}, 'hidden_act "nope" is not supported'),
        ({"vision_config": {"hidden_act": "nope"}}, 'vision_config.hidden_act "nope" is not supported'),
        ({"num_attention_heads": 5}, "hidden_size 64 is not supported .must be a multiple of num_attention_heads 5"),
        ({"rope_theta": -1.0}, "rope_theta -1.0 is not supported"),
        ({"no_such_field": 1}, "model_config: .*no_such_field"),
    ],
)
def test_preset_overrides_get_the_config_checks(tmp_path, capsys, override, message):
    """A preset with overrides is refused in one line as a config.json with the same values would be,
    before any model is built (not a KeyError from deep inside the network's construction)."""
    (tmp_path / "cfg.yaml").write_text(
        yaml.safe_dump(config(tmp_path / "run", model_config={"preset": "tiny", **override}))
    )
    assert train_cli([str(tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.data or cfg.stages
    base = {k: v for k, v in cfg.to_dict().items() if k != "stages"}
    for stage in cfg.stages:  # every stage is a valid config of its own
        assert load_config(base | {k: v for k, v in stage.items() if k != "name"}).data


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_accelerate_configs_parse(path):
    from accelerate.commands.config.config_args import load_config_from_file

    assert load_config_from_file(str(path)).num_processes >= 1


# ----------------------------------------------------------------------------- stages
def test_stages_chain_and_resume(tmp_path):
    """Stage 2 starts from stage 1's final weights; a resumed run skips finished stages."""
    from cogvlm.train import run

    settings = config(
        tmp_path / "run",
        data=[],
        max_steps=2,
        stages=[
            {"name": "warm", "data": [{"type": "synthetic", "seed": 1, "easy": True, "per_scene": 2}]},
            {"data": [{"type": "synthetic", "seed": 2, "per_scene": 2}], "lr": 1e-3, "max_steps": 3},
        ],
    )
    final = run(settings)
    assert final == tmp_path / "run" / "stage2" / "checkpoints" / "step-3"
    stage2 = yaml.safe_load((tmp_path / "run" / "stage2" / "train_config.yaml").read_text())
    assert stage2["model"] == str(tmp_path / "run" / "warm" / "checkpoints" / "step-2")
    assert stage2["lr"] == 1e-3 and stage2["stages"] == []
    assert (final / "tokenizer.model").is_file()  # a final checkpoint loads on its own
    before = weights(final)
    lines = (tmp_path / "run" / "stage2" / "metrics.jsonl").read_text()
    assert run(settings | {"resume": True}) == final
    assert (tmp_path / "run" / "stage2" / "metrics.jsonl").read_text() == lines
    assert all(torch.equal(before[k], v) for k, v in weights(final).items())
