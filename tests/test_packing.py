"""Prepacked CPU weights (`cogvlm.loading.packing`): the same answers as plain layers, and used
only where they may be (the whole model on the CPU, unquantised)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cogvlm
from cogvlm import cpu
from cogvlm.config import get_preset
from cogvlm.loading.packing import PackedLinear, WidenedConv2d, can_pack, onednn_takes, pack_linears
from cogvlm.model.cogvlm import CogVLMForCausalLM

pytestmark = pytest.mark.skipif(not can_pack(), reason="this PyTorch build has no oneDNN")
ONEDNN_BF16 = pytest.mark.skipif(not onednn_takes(torch.bfloat16), reason="oneDNN has no bf16 on this CPU")


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        pytest.param(torch.bfloat16, marks=ONEDNN_BF16),
    ],
)
@pytest.mark.parametrize("rows", [1, 8, 300])
def test_packed_linear_equals_linear(dtype, rows):
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=True).to(dtype)
    x = torch.randn(2, rows, 96, dtype=dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(PackedLinear(linear)(x), F.linear(x, linear.weight, linear.bias), **tol)


def test_load_packs_every_linear_on_the_cpu_and_answers_as_plain_layers(reference_dir):
    packed = cogvlm.load(reference_dir, device="cpu")
    plain = cogvlm.load(reference_dir, device="cpu", pack=False)
    linears = [m for m in plain.model.modules() if type(m) is nn.Linear]
    assert linears and not any(type(m) is nn.Linear for m in packed.model.modules())
    assert sum(isinstance(m, PackedLinear) for m in packed.model.modules()) == len(linears)
    assert packed.model.dtype == torch.float32
    image = reference_dir / "images" / "img0.png"
    for query in ("Describe the image.", "What is in it?"):
        assert packed.chat(query, image, max_new_tokens=12) == plain.chat(query, image, max_new_tokens=12)


@pytest.mark.parametrize("onednn_bf16", [pytest.param(True, marks=ONEDNN_BF16), False])
def test_bf16_layers_stay_plain_where_onednn_has_no_bf16(monkeypatch, onednn_bf16):
    """An AVX2-only CPU: oneDNN refuses to pack bf16, so those layers keep PyTorch's kernels (fp32
    ones are still packed), and a bf16 layer answers instead of failing in the reorder."""
    monkeypatch.setattr(cpu, "bf16_arithmetic", lambda: onednn_bf16)
    net = nn.Sequential(nn.Linear(24, 10).to(torch.bfloat16), nn.Linear(10, 8))  # shapes our kernel skips
    x = torch.randn(3, 24, dtype=torch.bfloat16)
    expected = net[1](net[0](x).float())
    assert pack_linears(net) == (2 if onednn_bf16 else 1)
    assert isinstance(net[0], PackedLinear) is onednn_bf16 and isinstance(net[1], PackedLinear)
    torch.testing.assert_close(net[1](net[0](x).float()), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("bf16_arithmetic", [pytest.param(True, marks=ONEDNN_BF16), False])
def test_bf16_convolutions_run_in_fp32_where_the_cpu_has_no_bf16_arithmetic(monkeypatch, bf16_arithmetic):
    """CogVLM2's patch and stride-2 convolutions: widened to fp32 only on such a CPU, with the
    same image tokens up to bf16 rounding; fp32 models keep theirs."""
    monkeypatch.setattr(cpu, "bf16_arithmetic", lambda: bf16_arithmetic)
    torch.manual_seed(0)
    config = dataclasses.replace(get_preset("tiny"), vision_conv=True)  # CogVLM2's stride-2 conv
    net = CogVLMForCausalLM(config).init_weights().to(torch.bfloat16).eval()
    pixels = torch.randn(1, 3, net.config.vision_config.image_size, net.config.vision_config.image_size)
    with torch.no_grad():
        plain = net.model.encode_images(pixels.to(torch.bfloat16)).float()
        pack_linears(net)
        packed = net.model.encode_images(pixels.to(torch.bfloat16))
    vision = net.model.vision
    assert isinstance(vision.patch_embedding.proj, WidenedConv2d) is not bf16_arithmetic
    assert isinstance(vision.conv, WidenedConv2d) is not bf16_arithmetic
    assert packed.dtype == torch.bfloat16
    torch.testing.assert_close(packed.float(), plain, rtol=0.05, atol=0.05 * plain.abs().max().item())
    fp32 = nn.Sequential(nn.Conv2d(3, 8, 2))
    pack_linears(fp32)
    assert type(fp32[0]) is nn.Conv2d


def test_quantised_and_mapped_models_are_not_packed(reference_dir):
    vlm = cogvlm.load(reference_dir, device="cpu", quantize="int8")
    assert not any(isinstance(m, PackedLinear) for m in vlm.model.modules())
    mapped = cogvlm.load(reference_dir, device_map={"": "cpu"})
    assert not any(isinstance(m, PackedLinear) for m in mapped.model.modules())


def test_pack_linears_leaves_other_dtypes_alone():
    net = nn.Sequential(nn.Linear(8, 8).half(), nn.Linear(8, 8))
    assert pack_linears(net) == 1 and type(net[0]) is nn.Linear and isinstance(net[1], PackedLinear)


def test_quantised_weights_in_plain_linears_are_left_alone():
    """A saved int8 folder loads as nn.Linear holding a quantised tensor subclass: not packable."""

    class Quantised(torch.Tensor):
        pass

    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    net[0].weight = nn.Parameter(net[0].weight.detach().as_subclass(Quantised), requires_grad=False)
    assert pack_linears(net) == 1 and type(net[0]) is nn.Linear and isinstance(net[1], PackedLinear)
