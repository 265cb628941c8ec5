"""CPU inference on prepacked weights: every linear layer's weight reordered once into oneDNN's
blocked layout, so each product runs oneDNN's kernel on it (what `torch.compile` with freezing
does on the CPU), instead of MKL reading the row-major weight at every call.

Measured on a 2-core AVX-512 machine (32000 x 1024 weight, one thread): one row 8.1 -> 5.9 ms in
fp32 and 6.0 -> 3.7 ms in bf16, eight rows 25.3 -> 13.4 ms and 7.9 -> 5.0 ms. Inference only:
a packed layer has no gradient, and its weight is no longer a parameter (state_dict and saving
see none), so `cogvlm.load` packs only when the model is wholly on the CPU, unquantised, in
float32 or bfloat16; training and the drop-in class keep plain layers.

A bf16 weight that decoding reads (any but the vision tower's and the visual experts', which see
only image positions) goes to our own kernel instead (`RowLinear`, `cogvlm/kernels.py`) where the CPU
has AVX512-BF16 and the kernel builds: it reads a weight faster than oneDNN for a decode step's rows.
On a CPU with AVX2 but no AVX512-BF16, oneDNN packs no bf16 and PyTorch's bf16 product reads the
weight once per row (a 1,263-token prompt: 7x the fp32 time), so every bf16 weight that fits goes
to our kernel, and beyond its rows to an fp32 product on the widened weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import cpu, kernels

PACKABLE = (torch.float32, torch.bfloat16)


class PackedLinear(nn.Module):
    """`nn.Linear` for CPU inference on a weight packed for oneDNN; `weight` is the packed tensor
    (it keeps the dtype, device and shape; its storage is opaque)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
            self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed for oneDNN"


class RowLinear(kernels.PackedRows):
    """`nn.Linear` for bf16 CPU inference on a weight in `kernels`' layout: our kernel for up to
    `kernels.max_rows()` rows (decode steps, a prompt's text), oneDNN through `F.linear` on the
    weight unpacked for more (a long text prompt, where the products outweigh the unpacking)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            self.weight = kernels.pack(linear.weight.detach())
            self.bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16, copy=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.numel() <= kernels.max_rows() * self.in_features:
            return kernels.rows(x, self.weight, self.bias)
        if onednn_takes(x.dtype):
            return F.linear(x, kernels.unpack(self.weight), self.bias)
        bias = None if self.bias is None else self.bias.float()  # no bf16 arithmetic on this CPU: fp32 sums
        return F.linear(x.float(), kernels.unpack(self.weight).float(), bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed for cogvlm's row kernel"


class WidenedConv2d(nn.Module):
    """A bf16 `nn.Conv2d` computed in fp32 (its weight widened once, the input per call, the output
    rounded back to bf16) for a CPU without bf16 arithmetic, where PyTorch's bf16 convolution is
    50x slower: the patch embedding and CogVLM2's stride-2 conv."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.float()).to(x.dtype)


def can_pack() -> bool:
    """Whether this PyTorch build has oneDNN (every official CPU wheel does)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_takes(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs weights of this dtype on this CPU: bf16 needs `cpu.bf16_arithmetic()`,
    which an AVX2-only CPU lacks; there a bf16 layer stays plain."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and cpu.bf16_arithmetic())


def pack_linears(model: nn.Module) -> int:
    """Replace every plain `nn.Linear` whose weight is a dense CPU tensor in float32 / bfloat16 by a
    `RowLinear` (bf16 weights our kernel takes, where it runs, but the image-only ones where oneDNN
    has bf16) or a `PackedLinear` (where oneDNN takes the dtype), one at a time (the plain weight is
    freed as its packed copy is made); returns how many were replaced. On a CPU without bf16
    arithmetic, bf16 convolutions become `WidenedConv2d`s too."""
    if not can_pack():
        return 0
    count = 0
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            bf16_conv = type(child) is nn.Conv2d and child.weight.dtype == torch.bfloat16
            if bf16_conv and _plain_cpu(child.weight) and not cpu.bf16_arithmetic():
                setattr(module, name, WidenedConv2d(child))
            elif type(child) is nn.Linear and _plain_cpu(child.weight):
                image_only = "vision" in f"{path}.{name}"  # where oneDNN has bf16, its prefill kernels serve these
                if (
                    kernels.fits(child.weight)
                    and kernels.available()
                    and not (image_only and onednn_takes(torch.bfloat16))
                ):
                    setattr(module, name, RowLinear(child))
                elif onednn_takes(child.weight.dtype):
                    setattr(module, name, PackedLinear(child))
                else:
                    continue
                count += 1
    return count


def _plain_cpu(weight: torch.Tensor) -> bool:
    """A plain dense CPU tensor in fp32/bf16 (not a quantised tensor subclass, as a saved int8 folder holds)."""
    return type(weight.data) is torch.Tensor and weight.device.type == "cpu" and weight.dtype in PACKABLE
