"""Prepacked CPU weights (`cogvlm.loading.packing`): the same answers as plain layers, and used
only where they may be (the whole model on the CPU, unquantised)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cogvlm
from cogvlm.loading.packing import PackedLinear, can_pack, pack_linears

pytestmark = pytest.mark.skipif(not can_pack(), reason="this PyTorch build has no oneDNN")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
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
