"""Fine-tuning CogVLM2 (the official fixture `reference-cogvlm2-tiny`, its own Llama-3 tokenizer):
LoRA launched with the shipped accelerate config and merged back with `cogvlm train merge`, and
CogVLM's expert recipe through `cogvlm train`; both end as official-layout folders that load.

A few steps on 4 synthetic records (28 px scenes, resized to the fixture's 56 px), on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import cogvlm
from cogvlm import CogVLMForCausalLM, synthetic
from cogvlm.cli import main
from cogvlm.train import load_config
from cogvlm.train.modes import PARTS, apply_mode, matches

ROOT = Path(__file__).resolve().parents[1]
COGVLM2 = Path(__file__).parent / "fixtures" / "reference-cogvlm2-tiny"


def settings(output_dir: Path, data: Path, **changes) -> dict:
    return {
        "model": str(COGVLM2),
        "cpu": True,
        "output_dir": str(output_dir),
        "data": [{"type": "jsonl", "path": str(data / "data.jsonl")}],
        "batch_size": 4,
        "max_steps": 4,
        "lr": 1e-2,
        "min_lr_ratio": 1.0,
        "save_every": 0,
        "eval_every": 0,
        **changes,
    }


def config_json(folder: Path) -> dict:
    """config.json without auto_map (kept only beside the remote-code files, which the fixture lacks)."""
    data = json.loads((folder / "config.json").read_text())
    data.pop("auto_map", None)
    return data


def losses(output_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def fixture_logits(model, tensors: dict[str, torch.Tensor], name: str = "batch_padded") -> torch.Tensor:
    """Logits of a fixture case with images and left padding."""
    inputs = {k: tensors[f"{name}.{k}"] for k in ("input_ids", "token_type_ids", "attention_mask")}
    images = iter(tensors[f"{name}.images"])
    inputs["images"] = [[next(images)] if n else [] for n in tensors[f"{name}.images_per_sample"].tolist()]
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.write_dataset(out, n=2, seed=3, size=28, per_scene=2)
    return out


@pytest.fixture(scope="module")
def fixture_weights() -> dict[str, torch.Tensor]:
    return load_file(COGVLM2 / "model.safetensors")


def test_parts_partition_cogvlm2():
    """Every CogVLM2 parameter is in exactly one part: the vision QKV bias with the vision experts,
    the stride-2 conv with the adapter (it is CogVLM2's own, not the pretrained EVA2-CLIP's)."""
    with torch.device("meta"):
        model = CogVLMForCausalLM(cogvlm.CogVLMConfig.from_json(COGVLM2 / "config.json"))
    for name, _ in model.named_parameters():
        assert sum(matches(name, patterns) for patterns in PARTS.values()) == 1, name
    assert matches("model.vision.conv.weight", PARTS["adapter"])
    assert matches("model.layers.0.self_attn.vision_expert_query_key_value.bias", PARTS["vision_experts"])


def test_expert_init_copies_the_language_expert_and_zeroes_the_qkv_bias(tmp_path, dataset_dir):
    """copy_language_to_vision: each vision expert then computes what its language expert computes;
    the language QKV has no bias, so the vision QKV's bias starts at zero."""
    model = CogVLMForCausalLM.from_pretrained(COGVLM2)
    assert model.model.layers[0].self_attn.vision_expert_query_key_value.bias.abs().max() > 0  # the fixture's
    cfg = load_config(settings(tmp_path, dataset_dir, mode="expert", copy_language_to_vision=True))
    trained = apply_mode(model, cfg)
    x = torch.randn(5, model.config.hidden_size)
    with torch.no_grad():
        for layer in trained.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            torch.testing.assert_close(
                attn.vision_expert_query_key_value(x), attn.language_expert_query_key_value(x), atol=1e-6, rtol=0
            )
            torch.testing.assert_close(attn.vision_expert_dense(x), attn.language_expert_dense(x), atol=0, rtol=0)
            torch.testing.assert_close(mlp.vision_mlp(x), mlp.language_mlp(x), atol=0, rtol=0)
    assert attn.vision_expert_query_key_value.bias.requires_grad  # and it trains


def test_expert_recipe_through_the_cli(tmp_path, dataset_dir, fixture_weights):
    """Language model and ViT frozen; vision experts (QKV bias included) and adapter (conv included)
    train; the checkpoint is the official layout, with the tokenizer, and loads."""
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(settings(tmp_path / "run", dataset_dir, mode="expert")))
    assert main(["train", str(tmp_path / "cfg.yaml"), "--max_steps", "3", "--lr", "3e-3"]) == 0
    final = tmp_path / "run" / "checkpoints" / "step-3"
    assert config_json(final) == config_json(COGVLM2)
    assert json.loads((final / "generation_config.json").read_text())["eos_token_id"] == [128001, 128009]
    after = load_file(final / "model.safetensors")
    assert after.keys() == fixture_weights.keys()
    for name, tensor in after.items():
        frozen = matches(name, PARTS["language"] + PARTS["vit"]) or name.endswith("inv_freq")
        assert torch.equal(tensor, fixture_weights[name]) == frozen, name
    assert not torch.equal(after["model.vision.conv.weight"], fixture_weights["model.vision.conv.weight"])
    vlm = cogvlm.load(final, device="cpu")  # its own tokenizer, copied along
    assert vlm.tokenizer.eos_token_ids == (128001, 128009)
    assert isinstance(vlm.chat("Describe this image.", COGVLM2 / "images" / "img0.png", max_new_tokens=4), str)


def test_lora_with_the_accelerate_config_merged_back(tmp_path, dataset_dir, fixture_weights, cogvlm2_tensors):
    """`accelerate launch --config_file configs/accelerate/single.yaml cogvlm train` (LoRA on the
    vision experts), then `cogvlm train merge`: an official-layout CogVLM2 folder equal to the
    unmerged model (1e-5, fp32), different from the base, and the language side untouched."""
    from peft import PeftModel

    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(settings(tmp_path / "run", dataset_dir, mode="lora")))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    command += [str(ROOT / "configs" / "accelerate" / "single.yaml"), "-m", "cogvlm.cli", "train"]
    done = subprocess.run(
        [*command, str(tmp_path / "cfg.yaml")],
        env={**os.environ, "OMP_NUM_THREADS": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    curve = losses(tmp_path / "run")
    assert len(curve) == 4 and curve[-1] < curve[0], curve
    checkpoint = tmp_path / "run" / "checkpoints" / "step-4"

    merged_dir = tmp_path / "merged"
    assert main(["train", "merge", str(checkpoint), str(merged_dir)]) == 0
    assert config_json(merged_dir) == config_json(COGVLM2)
    assert json.loads((merged_dir / "generation_config.json").read_text())["eos_token_id"] == [128001, 128009]
    assert (merged_dir / "tokenizer.json").is_file()
    weights = load_file(merged_dir / "model.safetensors")
    assert weights.keys() == fixture_weights.keys()
    changed = {name for name, tensor in weights.items() if not torch.equal(tensor, fixture_weights[name])}
    # LoRA folds into the vision experts' weights (their biases stay). The last layer's vision dense
    # and MLP only reach image positions' outputs, which carry no label: they get no gradient.
    assert all(matches(name, PARTS["vision_experts"]) and name.endswith(".weight") for name in changed), changed
    assert {f"model.layers.{i}.self_attn.vision_expert_query_key_value.weight" for i in (0, 1)} <= changed
    assert {name for name in changed if name.startswith("model.layers.0.")} == {
        f"model.layers.0.{m}.weight"
        for m in ("self_attn.vision_expert_query_key_value", "self_attn.vision_expert_dense")
        + tuple(f"mlp.vision_mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj"))
    }

    merged = CogVLMForCausalLM.from_pretrained(merged_dir)
    unmerged = PeftModel.from_pretrained(CogVLMForCausalLM.from_pretrained(COGVLM2), str(checkpoint)).eval()
    a, b = fixture_logits(merged, cogvlm2_tensors), fixture_logits(unmerged, cogvlm2_tensors)
    real = cogvlm2_tensors["batch_padded.attention_mask"].bool()
    assert (a - b)[real].abs().max() < 1e-5  # W + BA folded once vs added per call
    assert (a[:, -1] - cogvlm2_tensors["batch_padded.logits_last"]).abs().max() > 1e-3  # the official base's
    vlm = cogvlm.load(merged_dir, device="cpu")
    assert isinstance(vlm.chat("Describe this image.", COGVLM2 / "images" / "img0.png", max_new_tokens=4), str)
