"""Our bf16 CPU kernels (`cogvlm.kernels`): `RowLinear`'s products equal plain layers' through
both row kernels and the unpacked path, used only where decoding reads the weight; a decode
step's attention equals `attend_one` on the cache's layout; built once into the cache; oneDNN
where they cannot be built."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from cogvlm import cpu, kernels
from cogvlm.config import get_preset
from cogvlm.loading.packing import PackedLinear, RowLinear, can_pack, pack_linears
from cogvlm.model.cogvlm import CogVLMForCausalLM
from cogvlm.model.decoder import attend_one

needs_kernel = pytest.mark.skipif(
    not kernels.available(), reason="no AVX512-BF16 CPU or no C compiler: our kernels do not run here"
)


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """`kernels` built afresh into an empty cache folder (and forgotten again after the test)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernels._library.cache_clear()
    yield tmp_path / "cogvlm" / "kernels"
    kernels._library.cache_clear()


def _bf16_product(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """The expectation: fp32 sums of the same bf16 numbers, rounded to bf16 once."""
    out = x.float() @ linear.weight.float().T
    return (out if linear.bias is None else out + linear.bias.float()).to(torch.bfloat16)


def test_pack_and_unpack_give_back_the_weight():
    weight = torch.randn(48, 64).to(torch.bfloat16)
    packed = kernels.pack(weight)
    assert packed.shape == (3, 32, 16, 2)
    assert torch.equal(packed[1, 5, 7], weight[16 + 7, 10:12])  # block 1, input pair 5, output 7
    assert torch.equal(kernels.unpack(packed), weight)


def test_fits_only_bf16_weights_of_whole_blocks():
    assert kernels.fits(torch.zeros(32000, 1024, dtype=torch.bfloat16))
    assert not kernels.fits(torch.zeros(600, 64, dtype=torch.bfloat16))  # 600 outputs: not 16s
    assert not kernels.fits(torch.zeros(64, 48, dtype=torch.bfloat16))  # 48 inputs: not 32s
    assert not kernels.fits(torch.zeros(64, 64))


@needs_kernel
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 33, 300])
def test_row_linear_equals_linear(rows, bias):
    """Every row count: the one-row kernel, AMX (or the dot kernel) in 8s and 32s with their tails,
    and oneDNN on the unpacked weight past `max_rows`."""
    torch.manual_seed(rows)
    linear = nn.Linear(96, 80, bias=bias).to(torch.bfloat16)
    x = torch.randn(3, rows, 96, dtype=torch.bfloat16)[1:2]  # a view, not contiguous in its batch
    got = RowLinear(linear)(x)
    assert got.shape == (1, rows, 80) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, _bf16_product(x, linear), rtol=1e-2, atol=1e-2)


@needs_kernel
@pytest.mark.parametrize("kernel", ["cogvlm_rows_bf16", "cogvlm_rows_bf16_amx"])
@pytest.mark.parametrize("rows", [1, 5, 8, 17, 40])
def test_both_kernels_equal_the_product(kernel, rows):
    lib, amx = kernels._library()
    if kernel.endswith("amx") and not amx:
        pytest.skip("no AMX on this CPU")
    torch.manual_seed(0)
    linear = nn.Linear(1024, 49 * 16, bias=True).to(torch.bfloat16)  # 49 blocks: every kernel's tail runs
    x = torch.randn(rows, 1024, dtype=torch.bfloat16)
    got = kernels._product(getattr(lib, kernel), x, kernels.pack(linear.weight.detach()), linear.bias)
    torch.testing.assert_close(got, _bf16_product(x, linear), rtol=1e-2, atol=2e-2)


@needs_kernel
def test_pack_linears_gives_decoding_weights_to_the_kernel_and_image_ones_to_onednn():
    torch.manual_seed(0)
    config = dataclasses.replace(get_preset("tiny"), vocab_size=640)  # whole blocks of 16: lm_head fits too
    net = CogVLMForCausalLM(config).init_weights().to(torch.bfloat16).eval()
    ids = torch.tensor([[1, 5, 9, 30, 2, 7]])
    with torch.no_grad():
        plain = net(input_ids=ids).logits.float()
        pack_linears(net)
        packed = net(input_ids=ids).logits.float()
    kinds = {name: type(m) for name, m in net.named_modules() if isinstance(m, (RowLinear, PackedLinear, nn.Linear))}
    assert kinds["lm_head"] is RowLinear
    assert kinds["model.layers.0.self_attn.language_expert_query_key_value"] is RowLinear
    assert kinds["model.layers.1.mlp.language_mlp.down_proj"] is RowLinear
    assert kinds["model.layers.0.self_attn.vision_expert_query_key_value"] is PackedLinear
    assert kinds["model.layers.0.mlp.vision_mlp.gate_proj"] is PackedLinear
    assert all(t is PackedLinear for name, t in kinds.items() if name.startswith("model.vision."))
    assert (packed - plain).abs().max() < 0.05 * plain.abs().max()


@needs_kernel
def test_kernel_is_built_once_into_the_cache(fresh_build):
    assert kernels.available()
    built = list(fresh_build.glob("kernels-*.so"))
    assert len(built) == 1 and not list(fresh_build.glob(".*tmp"))
    stamp = built[0].stat().st_mtime_ns
    kernels._library.cache_clear()
    assert kernels.available() and built[0].stat().st_mtime_ns == stamp


@pytest.mark.skipif(not can_pack(), reason="this PyTorch build has no oneDNN")
def test_without_a_compiler_onednn_serves_after_one_warning(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    if cpu.has("avx512_bf16"):
        with pytest.warns(UserWarning, match="bf16 CPU kernels not built.*false failed"):
            assert not kernels.available()
    assert not kernels.available() and not list(fresh_build.glob("*"))
    net = nn.Sequential(nn.Linear(64, 64)).to(torch.bfloat16)
    assert pack_linears(net) == 1 and isinstance(net[0], PackedLinear)


def test_switched_off_by_the_environment(fresh_build, monkeypatch):
    monkeypatch.setenv("COGVLM_CPU_KERNELS", "0")
    assert not kernels.available() and kernels.max_rows() == 0
    assert not fresh_build.exists()


def _cache_views(b, h, length, head_dim, used):
    """Keys by row and values by column as a bf16 CPU cache holds them, `used` of `length`
    positions filled and NaN past them (the kernel must not read there)."""
    keys = torch.full((b, h, length, head_dim), float("nan"), dtype=torch.bfloat16)
    values = torch.full((b, h, head_dim, length), float("nan"), dtype=torch.bfloat16)
    keys[:, :, :used] = torch.randn(b, h, used, head_dim).to(torch.bfloat16)
    values[:, :, :, :used] = torch.randn(b, h, head_dim, used).to(torch.bfloat16)
    return keys[:, :, :used], values[:, :, :, :used].transpose(-1, -2)  # (B, H, S, D) both


@needs_kernel
@pytest.mark.parametrize(("b", "h", "used", "head_dim"), [(1, 8, 1300, 128), (3, 2, 37, 32), (2, 4, 5, 16)])
@pytest.mark.parametrize("masked", [False, True])
def test_attend_equals_attend_one(b, h, used, head_dim, masked):
    torch.manual_seed(used)
    keys, values = _cache_views(b, h, used + 11, head_dim, used)
    q = torch.randn(b, h, 1, head_dim).to(torch.bfloat16)
    mask = torch.rand(b, 1, 1, used) > 0.3 if masked else None
    assert kernels.attends(q, keys, values)
    got = kernels.attend(q, keys, values, mask)
    assert got.shape == (b, h, 1, head_dim) and not got.isnan().any()
    torch.testing.assert_close(got, attend_one(q, keys, values, mask), rtol=2e-2, atol=1e-2)


@needs_kernel
def test_attend_takes_only_the_layout_it_reads():
    keys, values = _cache_views(1, 4, 20, 32, 10)
    q = torch.randn(1, 4, 1, 32).to(torch.bfloat16)
    assert kernels.attends(q, keys, values)
    assert not kernels.attends(q, keys, values.contiguous())  # values by row
    assert not kernels.attends(q, keys.transpose(-1, -2).contiguous().transpose(-1, -2), values)  # keys by column
    assert not kernels.attends(torch.randn(1, 8, 1, 32).to(torch.bfloat16), keys, values)  # grouped heads
    assert not kernels.attends(q.float(), keys.float(), values.float())
    assert not kernels.attends(torch.randn(1, 4, 2, 32).to(torch.bfloat16), keys, values)  # two queries
