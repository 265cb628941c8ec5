"""Configs and presets: official fields in and out, parameter counts of the released shapes."""

from __future__ import annotations

import json

import pytest
import torch

from cogvlm import PRESETS, CheckpointError, CogVLMConfig, get_preset
from cogvlm.info import describe, parameter_counts
from cogvlm.model import CogVLMForCausalLM


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
    assert all(p.family == "CogVLM" for n, p in PRESETS.items() if not n.startswith(("cogvlm2-", "bench-cogvlm2")))


def test_round_trip_through_official_dict(reference_dir):
    data = json.loads((reference_dir / "config.json").read_text())
    config = CogVLMConfig.from_dict(data)
    assert config.to_dict() == data


def test_unknown_fields_ignored_and_eos_list(reference_dir):
    data = json.loads((reference_dir / "config.json").read_text())
    data |= {"rope_scaling": None, "eos_token_id": [2, 7]}
    data["vision_config"]["use_rope"] = False
    config = CogVLMConfig.from_dict(data)
    assert config.eos_token_id == 2 and config.eos_token_ids == (2, 7)
    assert config.family == "CogVLM"  # an eos list alone does not make CogVLM2
    assert CogVLMConfig.from_dict(config.to_dict()) == config


# ---- CogVLM2: told apart by the chosen rule, bos_token_id 128000 (Llama-3's) ----


def _cogvlm2_json(cogvlm2_dir) -> dict:
    return json.loads((cogvlm2_dir / "config.json").read_text())


def test_cogvlm2_fixture_config_read_and_written_back(cogvlm2_dir):
    data = _cogvlm2_json(cogvlm2_dir)
    config = CogVLMConfig.from_dict(data)
    assert config.family == "CogVLM2"
    assert (config.num_multi_query_heads, config.num_kv_heads) == (2, 2)
    assert config.rope_theta == 500000.0 and config.vision_expert_qkv_bias and config.vision_conv
    assert config.eos_token_ids == (128001, 128009) and config.eos_token_id == 128001
    assert config.pad_token_id == config.image_token_id == 128002
    assert config.context_length == 8192 and config.image_tokens == 6
    assert config.to_dict() == data


def test_cogvlm2_without_num_multi_query_heads_has_8(cogvlm2_dir):
    """The released config.json has no num_multi_query_heads key: the official class defaults it to 8."""
    data = _cogvlm2_json(cogvlm2_dir) | {"num_attention_heads": 8, "hidden_size": 128}
    del data["num_multi_query_heads"]
    config = CogVLMConfig.from_dict(data)
    assert config.num_kv_heads == 8 and config.to_dict() == data


def test_family_rule_is_the_bos_id(cogvlm2_dir, reference_dir):
    """bos_token_id 128000 decides, alone: it switches every field the CogVLM2 code hard-codes."""
    cogvlm1 = CogVLMConfig.from_dict(_cogvlm2_json(cogvlm2_dir) | {"bos_token_id": 1, "num_multi_query_heads": 4})
    assert cogvlm1.family == "CogVLM" and cogvlm1.num_kv_heads == 4
    assert (cogvlm1.rope_theta, cogvlm1.vision_expert_qkv_bias, cogvlm1.vision_conv) == (10000.0, False, False)
    assert cogvlm1.image_token_id is None and cogvlm1.image_tokens == 18
    data = json.loads((reference_dir / "config.json").read_text()) | {"bos_token_id": 128000}
    with pytest.raises(CheckpointError, match="num_multi_query_heads 8 is not supported"):
        CogVLMConfig.from_dict(data)  # CogVLM2 now: 8 KV heads by default, which 4 heads cannot group
    cogvlm2 = CogVLMConfig.from_dict(data | {"num_multi_query_heads": 2})
    assert cogvlm2.vision_conv and cogvlm2.rope_theta == 500000.0 and cogvlm2.image_tokens == 3


def test_our_fields_written_only_when_not_the_family_code(cogvlm2_dir):
    data = _cogvlm2_json(cogvlm2_dir)
    config = CogVLMConfig.from_dict(data).replace(rope_theta=1e6, vision_conv=False)
    written = config.to_dict()
    assert written == data | {"rope_theta": 1e6, "vision_conv": False}
    assert CogVLMConfig.from_dict(written) == config


def test_cogvlm2_presets():
    chat, chinese = get_preset("cogvlm2-llama3-chat-19b"), get_preset("cogvlm2-llama3-chinese-chat-19b")
    assert chat == chinese and chat.family == "CogVLM2"
    assert (chat.num_attention_heads, chat.num_kv_heads, chat.head_dim) == (32, 8, 128)
    assert chat.image_tokens == 2306 and chat.vision_config.num_positions == 9217
    assert chat.context_length == 8192 and chat.eos_token_ids == (128001, 128009) and chat.pad_token_id == 128002
    assert "num_multi_query_heads" not in chat.to_dict()  # as the released config.json
    bench = get_preset("bench-cogvlm2-1344")
    assert bench.image_tokens == 2306 and bench.vision_conv and bench.num_kv_heads < bench.num_attention_heads
    assert sum(parameter_counts(bench).values()) < 250e6  # small enough for a 2-core CPU


def test_cogvlm2_19b_count_matches_the_released_checkpoint():
    """The index's total_size 39,006,214,656 bf16 bytes / 2: the parameters plus the 32 stored
    rotary inv_freq buffers (64 each) in 1221 tensors."""
    config = get_preset("cogvlm2-llama3-chat-19b")
    assert sum(parameter_counts(config).values()) == 19_503_105_280
    with torch.device("meta"):
        state = CogVLMForCausalLM(config).state_dict()
    assert len(state) == 1221
    assert sum(t.numel() for t in state.values()) == 39_006_214_656 // 2
    assert state["model.vision.conv.weight"].shape == (1792, 1792, 2, 2)
    assert state["model.layers.0.self_attn.language_expert_query_key_value.weight"].shape == (6144, 4096)
    assert state["model.layers.0.self_attn.vision_expert_query_key_value.bias"].shape == (6144,)


def test_describe_cogvlm2():
    text = describe("cogvlm2-llama3-chat-19b")
    assert text.startswith("CogVLM2") and "19.5 B" in text and "2306" in text and "8 key/value" in text


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
    assert "17.6 B" in text and "bf16" in text and "int4" in text and "1227" in text
