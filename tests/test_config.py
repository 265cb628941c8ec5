"""Configs and presets: official fields in and out, parameter counts of the released shapes."""

from __future__ import annotations

import json

import pytest

from cogvlm import CheckpointError, CogVLMConfig, get_preset
from cogvlm.info import describe, parameter_counts


def test_chat_preset_is_17_6_billion():
    total = sum(parameter_counts(get_preset("cogvlm-chat-17b")).values())
    assert abs(total - 17.6e9) / 17.6e9 < 0.005


def test_released_geometry():
    chat = get_preset("cogvlm-chat-17b")
    assert chat.image_tokens == 1227 and chat.vision_config.num_positions == 1226
    assert chat.template_version == "chat" and chat.rms_norm_eps == 1e-5
    base224 = get_preset("cogvlm-base-224")
    assert base224.image_tokens == 258 and base224.vision_config.num_positions == 257
    assert get_preset("cogvlm-grounding-generalist").template_version == "base"
    assert get_preset("bench-490").image_tokens == 1227


def test_round_trip_through_official_dict(reference_dir):
    data = json.loads((reference_dir / "config.json").read_text())
    config = CogVLMConfig.from_dict(data)
    assert config.to_dict() == data


def test_unknown_fields_ignored_and_eos_list(reference_dir):
    data = json.loads((reference_dir / "config.json").read_text())
    data |= {"rope_scaling": None, "eos_token_id": [2, 7]}
    data["vision_config"]["use_rope"] = False
    config = CogVLMConfig.from_dict(data)
    assert config.eos_token_id == 2


def test_missing_fields_named(reference_dir):
    data = json.loads((reference_dir / "config.json").read_text())
    del data["num_hidden_layers"]
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        CogVLMConfig.from_dict(data)


def test_unknown_preset():
    with pytest.raises(CheckpointError, match="unknown preset"):
        get_preset("cogvlm-huge")


def test_describe_prints_memory():
    text = describe("cogvlm-chat-17b")
    assert "17.640 B" in text and "bf16" in text and "int4" in text and "1227" in text
