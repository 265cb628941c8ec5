"""config.json fields that change the computation: honoured (checked against transformers) or
refused with one line that names the file, the field, the value and what is supported."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from cogvlm import CheckpointError, CogVLMConfig, CogVLMForCausalLM, get_preset
from cogvlm.config import ACTIVATIONS
from cogvlm.export import language_state_dict

transformers = pytest.importorskip("transformers")

SHIPPED = Path(__file__).parents[1] / "src" / "cogvlm" / "assets" / "tiny-shapes" / "config.json"
TEXT = torch.tensor([[1, 45, 67, 89, 120, 33, 250, 17, 99, 5, 300, 42]])


def _random_model(config: CogVLMConfig) -> CogVLMForCausalLM:
    torch.manual_seed(0)
    return CogVLMForCausalLM(config).init_weights().eval()


def _llama(config: CogVLMConfig, model: CogVLMForCausalLM):
    """transformers' LLaMA with the same settings, built from our language-expert weights."""
    llama_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        hidden_act=config.hidden_act,
        rope_theta=config.rope_theta,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=False,
    )
    llama = transformers.LlamaForCausalLM(llama_config).eval()
    llama.load_state_dict(language_state_dict(model.state_dict(), config))
    return llama


@pytest.mark.parametrize(
    ("hidden_act", "rope_theta"),
    [
        ("silu", 10000.0),
        ("silu", 500000.0),
        ("silu", 100.0),
        ("gelu", 10000.0),
        ("gelu_new", 1000.0),
    ],
)
def test_text_logits_equal_llama_with_same_fields(hidden_act, rope_theta, one_thread):
    """A non-default field changes the logits, and they equal transformers' with that field."""
    config = get_preset("tiny").replace(hidden_act=hidden_act, rope_theta=rope_theta)
    model = _random_model(config)
    llama = _llama(config, model)
    with torch.no_grad():
        ours = model(input_ids=TEXT).logits
        theirs = llama(input_ids=TEXT).logits
        default = _random_model(get_preset("tiny"))(input_ids=TEXT).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    changed = (hidden_act, rope_theta) != ("silu", 10000.0)
    assert (ours - default).abs().max().item() > 1e-3 if changed else torch.equal(ours, default)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_table_means_what_transformers_means(name):
    x = torch.linspace(-8, 8, 4001, dtype=torch.float32)
    torch.testing.assert_close(
        ACTIVATIONS[name](x),
        transformers.activations.ACT2FN[name](x),
        atol=1e-7,
        rtol=0,
    )


@pytest.mark.parametrize("hidden_act", ["gelu_pytorch_tanh", "relu"])
def test_vision_hidden_act_is_the_vit_mlp_activation(hidden_act, one_thread):
    tiny = get_preset("tiny").replace(initializer_range=0.5)  # activations wide enough to tell apart
    config = tiny.replace(vision_config=dataclasses.replace(tiny.vision_config, hidden_act=hidden_act))
    model, default = _random_model(config), _random_model(tiny)
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mlp = model.model.vision.transformer.layers[0].mlp
        x = torch.randn(2, 5, config.vision_config.hidden_size)
        expected = mlp.fc2(transformers.activations.ACT2FN[hidden_act](mlp.fc1(x)))
        torch.testing.assert_close(mlp(x), expected, atol=1e-6, rtol=0)
        changed = model.model.encode_images(images) - default.model.encode_images(images)
    assert changed.abs().max().item() > 1e-6  # same weights: exactly 0 if the field were ignored


def _official(reference_dir: Path) -> dict:
    return json.loads((reference_dir / "config.json").read_text())


@pytest.mark.parametrize("path", [SHIPPED, None], ids=["shipped", "reference-tiny"])
def test_published_configs_keep_defaults(path, reference_dir):
    path = path or reference_dir / "config.json"
    config = CogVLMConfig.from_json(path)
    assert config.rope_theta == 10000.0 and config.hidden_act == "silu"
    assert config.vision_config.hidden_act == "gelu"
    assert config.context_length == config.max_position_embeddings == 2048
    assert "rope_theta" not in config.to_dict()  # an official config.json is written back as it was


def test_rope_theta_written_only_when_not_default(reference_dir):
    data = _official(reference_dir) | {"rope_theta": 500000.0}
    config = CogVLMConfig.from_dict(data)
    assert config.rope_theta == 500000.0 and config.to_dict() == data
    assert CogVLMConfig.from_dict(config.to_dict()) == config


def _official_with(reference_dir: Path, field: str, value) -> dict:
    """reference-tiny's config.json with one field (`vision_config.x` for the ViT's) set."""
    data = copy.deepcopy(_official(reference_dir))
    if field.startswith("vision_config."):
        data["vision_config"][field.split(".", 1)[1]] = value
    else:
        data[field] = value
    return data


REFUSED = [  # (field, value, words the message must hold besides the field and the value)
    ("hidden_act", "swiglu", "known: silu, swish, gelu"),
    ("vision_config.hidden_act", "gelu_10", "known: silu"),
    ("tie_word_embeddings", True, "only false"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "only null"),
    ("pretraining_tp", 2, "only 1"),
    ("attention_bias", True, "only false"),
    ("mlp_bias", True, "only false"),
    ("num_key_value_heads", 2, "only 4: grouped-query attention"),
    ("num_multi_query_heads", 2, "only 4: grouped-query attention"),
    ("head_dim", 32, "only 16"),
    ("hidden_size", 66, "multiple of num_attention_heads 4"),
    ("rope_theta", 0, "positive number"),
    ("rope_theta", "10000", "positive number"),
    ("vision_config.hidden_size", 30, "multiple of vision_config.num_heads 4"),
    ("vision_config.num_positions", 10, "= 5"),
]


@pytest.mark.parametrize(("field", "value", "words"), REFUSED, ids=[f"{f}={v}" for f, v, _ in REFUSED])
def test_refused_in_one_line(field, value, words, reference_dir):
    with pytest.raises(CheckpointError) as info:
        CogVLMConfig.from_dict(_official_with(reference_dir, field, value), "model/config.json")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"model/config.json: {field} {json.dumps(value)} is not supported (")
    assert words in message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rope_scaling", None),
        ("num_key_value_heads", 4),
        ("pretraining_tp", 1),
        ("attention_bias", False),
        ("head_dim", 16),
        ("rope_theta", 500000),
        ("hidden_act", "swish"),
        ("vision_config.dropout_prob", 0.1),
    ],
)
def test_values_the_model_computes_with_are_accepted(field, value, reference_dir):
    CogVLMConfig.from_dict(_official_with(reference_dir, field, value))


REFUSED_COGVLM2 = [  # on reference-cogvlm2-tiny's config.json: 4 query heads, 2 KV heads
    ("num_multi_query_heads", 3, "must divide num_attention_heads 4"),
    ("num_multi_query_heads", 0, "must divide num_attention_heads 4"),
    ("num_multi_query_heads", 2.0, "must divide num_attention_heads 4"),
    ("num_key_value_heads", 4, "only 2: the key/value heads are num_multi_query_heads"),
]


@pytest.mark.parametrize(("field", "value", "words"), REFUSED_COGVLM2, ids=[f"{f}={v}" for f, v, _ in REFUSED_COGVLM2])
def test_cogvlm2_refused_in_one_line(field, value, words, cogvlm2_dir):
    data = json.loads((cogvlm2_dir / "config.json").read_text()) | {field: value}
    with pytest.raises(CheckpointError) as info:
        CogVLMConfig.from_dict(data, "model/config.json")
    assert str(info.value).startswith(f"model/config.json: {field} {json.dumps(value)} is not supported (")
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"), [("num_key_value_heads", 2), ("num_multi_query_heads", 4), ("num_multi_query_heads", 1)]
)
def test_cogvlm2_grouping_accepted(field, value, cogvlm2_dir):
    data = json.loads((cogvlm2_dir / "config.json").read_text()) | {field: value}
    CogVLMConfig.from_dict(data)
