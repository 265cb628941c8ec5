"""Device maps: CPU + disk offload reproduces the plain model exactly, plans keep layers whole,
the official accelerate recipe works unchanged, and the automatic choice fits simulated GPUs.

Offloading moves the same fp32 tensors around, so logits must match to float rounding
(atol 1e-5) and greedy tokens exactly.
"""

from __future__ import annotations

import re

import pytest
import torch

from cogvlm import CogVLMForCausalLM
from cogvlm.cli.options import Parser, add_loading_flags, load_options
from cogvlm.config import PRESETS
from cogvlm.errors import SettingsError
from cogvlm.generation import KVCache
from cogvlm.loading import LoadOptions
from cogvlm.loading.placement import choose_setting, describe_plan, parse_max_memory, plan_device_map, read_device_map

GiB = 2**30
CASES = ["batch_mixed", "chat_img_hist"]  # images and text, padding, two rows


def case_inputs(reference_tensors, name):
    t = {k.split(".", 1)[1]: v for k, v in reference_tensors.items() if k.startswith(name + ".")}
    images = None
    if "images" in t:
        it = iter(t["images"])
        images = [[next(it)] if n else [] for n in t["images_per_sample"].tolist()]
    return t, images


def assert_same_outputs(model, reference_model, reference_tensors):
    for name in CASES:
        t, images = case_inputs(reference_tensors, name)
        args = dict(
            input_ids=t["input_ids"],
            token_type_ids=t["token_type_ids"],
            attention_mask=t["attention_mask"],
            images=images,
        )
        with torch.no_grad():
            got, want = model(**args).logits, reference_model(**args).logits
        real = t["attention_mask"].bool()
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
        if name == CASES[0]:  # generation through the KV cache (offloaded layers' caches included)
            out = model.generate(**args, max_new_tokens=t["new_tokens"].shape[1])
            assert torch.equal(out, t["sequences"]), name


def model_bytes(config) -> int:
    from accelerate.utils import compute_module_sizes

    with torch.device("meta"):
        return compute_module_sizes(CogVLMForCausalLM(config))[""]


def test_cpu_and_disk_map_equals_no_map(reference_dir, reference_model, reference_tensors, tmp_path):
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "disk",
        "model.vision": "disk",
        "lm_head": "cpu",
    }
    model = CogVLMForCausalLM.from_pretrained(reference_dir, device_map=device_map, offload_folder=tmp_path)
    assert model.model.layers[1].mlp.language_mlp.up_proj.weight.device.type == "meta"  # offloaded
    assert model.model.layers[0].mlp.language_mlp.up_proj.weight.device.type == "cpu"
    assert not any(tmp_path.iterdir())  # safetensors: read from the checkpoint itself, never copied
    assert_same_outputs(model, reference_model, reference_tensors)
    cache = KVCache(model, 1, 4)
    assert {k.device.type for k, _ in cache.layers} == {"cpu"}  # the execution device, not meta


def test_planned_cpu_disk_split(reference_dir, reference_model, reference_tensors):
    budget = {"cpu": model_bytes(reference_model.config) // 2}
    model = CogVLMForCausalLM.from_pretrained(reference_dir, device_map="sequential", max_memory=budget)
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    assert_same_outputs(model, reference_model, reference_tensors)


def test_official_recipe(reference_dir, reference_model, reference_tensors, tmp_path):
    """The model card's multi-GPU recipe, word for word, with a CPU/disk budget instead of GPUs."""
    from accelerate import infer_auto_device_map, init_empty_weights, load_checkpoint_and_dispatch

    config = reference_model.config
    with init_empty_weights():
        model = CogVLMForCausalLM(config)
    device_map = infer_auto_device_map(
        model,
        max_memory={"cpu": model_bytes(config) // 2},
        no_split_module_classes=["CogVLMDecoderLayer", "TransformerLayer"],
    )
    assert {"cpu", "disk"} <= set(device_map.values())
    model = load_checkpoint_and_dispatch(
        model, str(reference_dir), device_map=device_map, offload_folder=str(tmp_path)
    ).eval()
    assert_same_outputs(model, reference_model, reference_tensors)


def test_17b_plan_on_two_24gib_gpus():
    with torch.device("meta"):
        model = CogVLMForCausalLM(PRESETS["cogvlm-chat-17b"])
    budget = {0: "24GiB", 1: "24GiB"}
    plan = plan_device_map(model, "auto", budget, torch.bfloat16)
    assert set(plan.values()) == {0, 1}  # both GPUs, nothing offloaded
    for key in plan:  # a layer is never split: keys stop at a whole layer (or above it)
        assert not re.match(r"model\.(vision\.transformer\.)?layers\.\d+\.", key), key
    from accelerate.utils import compute_module_sizes

    sizes = compute_module_sizes(model, dtype=torch.bfloat16)
    for gpu in (0, 1):
        assert sum(sizes[k] for k, d in plan.items() if d == gpu) <= 24 * GiB
    text = describe_plan("cogvlm-chat-17b", "auto", parse_max_memory("0=24GiB,1=24GiB,cpu=64GiB"))
    assert "model.layers.0-" in text and "no offload" in text


def test_describe_plan_offload_and_quantised():
    text = describe_plan("cogvlm-chat-17b", "sequential", {0: "12GiB", "cpu": "64GiB"})
    assert "offloaded to cpu" in text
    text = describe_plan("cogvlm-chat-17b", "auto", {0: "24GiB"}, quantize="int4")
    assert "everything" in text and "no offload" in text


@pytest.mark.parametrize(
    "free, quantize, mapped, vision",
    [
        ({0: 80 * GiB}, None, False, False),  # bf16 fits one GPU
        ({0: 24 * GiB, 1: 24 * GiB}, None, True, False),  # device map over two
        ({0: 28 * GiB}, "int8", False, False),  # 33 GiB of bf16 does not fit, int8 does
        ({0: 22 * GiB, "cpu": 64 * GiB}, "int4", False, False),
        ({0: 14 * GiB}, "int4", False, True),  # only with the vision tower in int4 too
    ],
)
def test_choose_setting(free, quantize, mapped, vision):
    setting, message = choose_setting(PRESETS["cogvlm-chat-17b"], free)
    assert setting["quantize"] == quantize and (setting["device_map"] == "auto") == mapped
    assert setting["quantize_vision"] == vision and setting["device"].startswith("cuda")
    assert (quantize or "bfloat16") in message


def test_choose_setting_falls_back():
    setting, message = choose_setting(PRESETS["cogvlm-chat-17b"], {0: 4 * GiB, "cpu": 64 * GiB})
    assert setting["device_map"] == "auto" and "cpu" in setting["max_memory"] and "offload" in message
    assert choose_setting(PRESETS["tiny"], {"cpu": GiB})[0]["device"] == "cpu"


def test_flags_and_kwargs(tmp_path):
    parser = Parser()
    add_loading_flags(parser, device_default="cpu")
    args = parser.parse_args(["--device-map", "auto", "--max-memory", "0=24GiB,cpu=1.5GB", "--quantize", "int8"])
    assert load_options(args, progress=False) == LoadOptions(
        device="cpu", device_map="auto", max_memory={0: 24 * GiB, "cpu": 1_500_000_000}, quantize="int8"
    )
    (tmp_path / "map.json").write_text('{"": "cpu"}')
    assert read_device_map(str(tmp_path / "map.json")) == {"": "cpu"}
    with pytest.raises(SettingsError):
        read_device_map("everywhere")
    with pytest.raises(ValueError):
        parse_max_memory("gpu0=24GiB")


def test_quantised_layers_are_not_offloaded(reference_dir):
    with pytest.raises(SettingsError, match="offloaded"):
        CogVLMForCausalLM.from_pretrained(reference_dir, device_map={"": "disk"}, quantize="int8")
