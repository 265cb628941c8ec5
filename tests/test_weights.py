"""Checkpoint folders: round trips, formats, and one clear error per bad case."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cogvlm import CheckpointError, CogVLMForCausalLM
from cogvlm.loading.files import SAFE_INDEX, parse_size


@pytest.fixture()
def folder(tmp_path, reference_dir) -> Path:
    out = tmp_path / "ckpt"
    out.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(reference_dir / name, out / name)
    return out


def _assert_same(a: CogVLMForCausalLM, b: CogVLMForCausalLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_round_trip_unsharded(tmp_path, reference_model):
    reference_model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not (tmp_path / "out" / SAFE_INDEX).exists()
    _assert_same(reference_model, CogVLMForCausalLM.from_pretrained(tmp_path / "out"))
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_round_trip_sharded_official_layout(tmp_path, reference_model, reference_dir):
    reference_model.save_pretrained(tmp_path / "out", max_shard_size="300KB")
    index = json.loads((tmp_path / "out" / SAFE_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    # Same names and shapes as the official checkpoint (inv_freq included, as the official save).
    official = load_file(reference_dir / "model.safetensors")
    assert set(index["weight_map"]) == set(official)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    expected = json.loads((reference_dir / "config.json").read_text())
    assert "auto_map" in expected and not list(reference_dir.glob("*.py"))
    expected.pop("auto_map")  # it names remote-code files this folder does not have
    assert config == expected
    _assert_same(reference_model, CogVLMForCausalLM.from_pretrained(tmp_path / "out"))


def test_save_keeps_remote_code_and_auto_map(folder, tmp_path):
    """A folder that loaded with the official code still does after a save: its .py files come
    along and auto_map stays; the generation config is the source's own."""
    code = {
        "configuration_cogvlm.py": "# config code\n",
        "modeling_cogvlm.py": "# model code\n",
        "visual.py": "# vision code\n",
    }
    for name, text in code.items():
        (folder / name).write_text(text)
    (folder / "generation_config.json").write_text('{"do_sample": true, "temperature": 0.6}')
    CogVLMForCausalLM.from_pretrained(folder).save_pretrained(tmp_path / "saved")
    saved = tmp_path / "saved"
    assert {p.name: p.read_text() for p in saved.glob("*.py")} == code
    assert (
        json.loads((saved / "config.json").read_text())["auto_map"]
        == json.loads((folder / "config.json").read_text())["auto_map"]
    )
    assert json.loads((saved / "generation_config.json").read_text()) == {"do_sample": True, "temperature": 0.6}


def test_bin_checkpoint(folder, reference_model):
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    _assert_same(reference_model, CogVLMForCausalLM.from_pretrained(folder))


def test_sharded_bin_checkpoint(folder, reference_model):
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    halves = {
        "pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
        "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :],
    }
    for file, keys in halves.items():
        torch.save({k: state[k] for k in keys}, folder / file)
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, keys in halves.items() for k in keys}})
    )
    _assert_same(reference_model, CogVLMForCausalLM.from_pretrained(folder))


def test_without_inv_freq(folder, reference_model):
    state = {k: v for k, v in load_file(folder / "model.safetensors").items() if "inv_freq" not in k}
    save_file(state, folder / "model.safetensors")
    _assert_same(reference_model, CogVLMForCausalLM.from_pretrained(folder))


def test_dtype_and_unknown_config_fields(folder):
    config = json.loads((folder / "config.json").read_text())
    config["some_future_field"] = {"x": 1}
    (folder / "config.json").write_text(json.dumps(config))
    model = CogVLMForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.rotary_emb.inv_freq.dtype == torch.bfloat16


def _message(folder) -> str:
    with pytest.raises(CheckpointError) as info:
        CogVLMForCausalLM.from_pretrained(folder)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_no_config(folder):
    (folder / "config.json").unlink()
    assert "config.json" in _message(folder)


def test_missing_required_config_field(folder):
    config = json.loads((folder / "config.json").read_text())
    del config["hidden_size"]
    del config["vision_config"]["patch_size"]
    (folder / "config.json").write_text(json.dumps(config))
    message = _message(folder)
    assert "patch_size" in message


def test_no_weights(folder):
    (folder / "model.safetensors").unlink()
    assert "no weights" in _message(folder)


def test_truncated_file(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    message = _message(folder)
    assert "model.safetensors" in message and "corrupt or truncated" in message


def test_corrupt_file(folder):
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    assert "corrupt or truncated" in _message(folder)


def test_corrupt_bin(folder):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    assert "pytorch_model.bin" in _message(folder)


def test_every_key_problem_in_one_error(folder):
    state = load_file(folder / "model.safetensors")
    del state["model.norm.weight"]
    del state["lm_head.weight"]
    state["model.extra.weight"] = torch.zeros(3)
    state["model.layers.0.input_layernorm.weight"] = torch.zeros(65)
    save_file(state, folder / "model.safetensors")
    message = _message(folder)
    for part in (
        "missing 2",
        "model.norm.weight",
        "lm_head.weight",
        "unexpected 1",
        "model.extra.weight",
        "wrong shape 1",
        "model.layers.0.input_layernorm.weight [65] != [64]",
    ):
        assert part in message


def test_index_names_missing_shard(folder, reference_model):
    reference_model.save_pretrained(folder, max_shard_size="300KB")
    next(folder.glob("model-00002-*.safetensors")).unlink()
    assert "model-00002" in _message(folder)


def test_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a model folder"):
        CogVLMForCausalLM.from_pretrained(tmp_path / "nope")


@pytest.mark.parametrize(
    "text,expected", [("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("300KB", 300_000), ("1.5MB", 1_500_000), (1234, 1234)]
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected
