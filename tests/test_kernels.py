"""Our bf16 CPU kernels (`cogvlm.kernels`): `RowLinear`'s products equal plain layers' through
both row kernels and the unpacked path, used only where decoding reads the weight; a decode
step's attention equals `attend_one` on the cache's layout; built once into the cache; oneDNN
where they cannot be built."""

from __future__ import annotations

import dataclasses
import os
import subprocess

import pytest
import torch
from torch import nn

from cogvlm import cpu, kernels
from cogvlm.config import get_preset
from cogvlm.loading.packing import PackedLinear, RowLinear, can_pack, onednn_takes, pack_linears
from cogvlm.model.cogvlm import CogVLMForCausalLM
from cogvlm.model.decoder import RMSNorm, RotaryEmbedding, apply_rotary, attend_one

needs_kernel = pytest.mark.skipif(
    not kernels.available(), reason="no AVX512-BF16 or AVX2 CPU, or no C compiler: our kernels do not run here"
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
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 33, 300, 600])
def test_row_linear_equals_linear(rows, bias):
    """Every row count: the one-row kernel, AMX (or the dot kernel; on AVX2, 4 rows at a time) with
    their tails, and oneDNN (on AVX2 fp32 sums) on the unpacked weight past `max_rows`."""
    torch.manual_seed(rows)
    linear = nn.Linear(96, 80, bias=bias).to(torch.bfloat16)
    x = torch.randn(3, rows, 96, dtype=torch.bfloat16)[1:2]  # a view, not contiguous in its batch
    got = RowLinear(linear)(x)
    assert got.shape == (1, rows, 80) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, _bf16_product(x, linear), rtol=1e-2, atol=1e-2)


@pytest.fixture(scope="module", params=["native", "avx2"])
def build(request, tmp_path_factory):
    """The kernels built for this CPU, and built for AVX2 alone (which an AVX-512 CPU runs too),
    each once for the module, into one fresh cache folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "kernel-builds"))
        if request.param == "avx2":
            if not cpu.has("avx2_fma"):
                pytest.skip("no AVX2 on this CPU")
            patch.setattr(kernels, "_isa", lambda: "avx2")
        kernels._library.cache_clear()
        built = kernels._library()
        kernels._library.cache_clear()
    if built is None:
        pytest.skip("our kernels do not run here")
    return built


@needs_kernel
@pytest.mark.parametrize("kernel", ["cogvlm_rows_bf16", "cogvlm_rows_bf16_amx"])
@pytest.mark.parametrize("rows", [1, 5, 8, 17, 40])
def test_each_kernel_equals_the_product(build, kernel, rows):
    lib, isa = build
    if kernel.endswith("amx") and isa != "amx":
        pytest.skip("no AMX on this CPU")
    torch.manual_seed(0)
    linear = nn.Linear(1024, 49 * 16, bias=True).to(torch.bfloat16)  # 49 blocks: every kernel's tail runs
    x = torch.randn(rows, 1024, dtype=torch.bfloat16)
    got = kernels._product(getattr(lib, kernel), x, kernels.pack(linear.weight.detach()), linear.bias)
    torch.testing.assert_close(got, _bf16_product(x, linear), rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("kernel", ["cogvlm_rows_bf16", "cogvlm_rows_bf16_amx"])
def test_sums_round_to_nearest_even_as_torch_does(build, kernel):
    """Exact sums that fall halfway between bf16 numbers (and a NaN): rounded as PyTorch rounds
    fp32 to bf16, ties to even, NaN kept."""
    lib, isa = build
    if kernel.endswith("amx") and isa != "amx":
        pytest.skip("no AMX on this CPU")
    steps = torch.arange(32, dtype=torch.float32)
    weight = torch.zeros(32, 64)
    weight[:, 0] = 1 + steps * 2**-7  # 1 + j ulps of bf16 at 1
    weight[5, 0] = float("nan")
    bias = torch.full((32,), 2**-8).to(torch.bfloat16)  # half an ulp: every sum is a tie
    x = torch.zeros(3, 64)
    x[:, 0] = 1
    weight, x = weight.to(torch.bfloat16), x.to(torch.bfloat16)
    got = kernels._product(getattr(lib, kernel), x, kernels.pack(weight), bias)
    expected = (x.float() @ weight.float().T + bias.float()).to(torch.bfloat16)
    assert got[0, 5].isnan() and torch.equal(got.nan_to_num(), expected.nan_to_num())
    assert got[0, 0] == 1 and got[0, 1] == 1 + 2 * 2**-7  # ties went to the even neighbour


@needs_kernel
def test_pack_linears_gives_decoding_weights_to_the_kernel_and_image_ones_to_onednn():
    """Image-only weights (the vision tower, the visual experts) go to oneDNN where it has bf16
    kernels for their long prompts, to ours where it has none (an AVX2-only CPU)."""
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
    image_only = PackedLinear if onednn_takes(torch.bfloat16) else RowLinear
    assert kinds["model.layers.0.self_attn.vision_expert_query_key_value"] is image_only
    assert kinds["model.layers.0.mlp.vision_mlp.gate_proj"] is image_only
    assert all(t is image_only for name, t in kinds.items() if name.startswith("model.vision."))
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
    if kernels._isa() is not None:
        with pytest.warns(UserWarning, match="bf16 CPU kernels not built.*false failed"):
            assert not kernels.available()
    assert not kernels.available() and not list(fresh_build.glob("*"))
    net = nn.Sequential(nn.Linear(64, 64)).to(torch.bfloat16)
    if onednn_takes(torch.bfloat16):
        assert pack_linears(net) == 1 and isinstance(net[0], PackedLinear)
    else:  # an AVX2-only CPU: PyTorch's plain bf16 kernels serve
        assert pack_linears(net) == 0 and type(net[0]) is nn.Linear


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


@pytest.fixture
def built(build, monkeypatch):
    """`kernels` answering from each of `build`'s builds."""
    monkeypatch.setattr(kernels, "_library", lambda: build)
    return build


@pytest.mark.parametrize(
    ("b", "h", "hkv", "used", "head_dim"),
    [(1, 8, 8, 1300, 128), (3, 2, 2, 37, 32), (2, 4, 4, 5, 16), (2, 8, 2, 300, 128)],
)
@pytest.mark.parametrize("masked", [False, True])
def test_attend_equals_attend_one(built, b, h, hkv, used, head_dim, masked):
    """One query head per KV head, and grouped heads (query head j reads KV head j // (H / Hkv))."""
    torch.manual_seed(used)
    keys, values = _cache_views(b, hkv, used + 11, head_dim, used)
    q = torch.randn(b, h, 1, head_dim).to(torch.bfloat16)
    mask = torch.rand(b, 1, 1, used) > 0.3 if masked else None
    assert kernels.attends(q, keys, values) == (h == hkv or built[1] == "avx2")  # groups: where measured faster
    got = kernels.attend(q, keys, values, mask)  # the kernel computes groups right on every build
    assert got.shape == (b, h, 1, head_dim) and not got.isnan().any()
    torch.testing.assert_close(got, attend_one(q, keys, values, mask), rtol=2e-2, atol=1e-2)


def test_masked_keys_weigh_exactly_nothing(built):
    """A masked key's probability is 0, not exp(-87): its value, however large, adds nothing."""
    keys, values = _cache_views(1, 2, 40, 32, 40)
    values[:, :, 7] = 1e38
    mask = torch.ones(1, 1, 1, 40, dtype=torch.bool)
    mask[..., 7] = False
    q = torch.randn(1, 2, 1, 32).to(torch.bfloat16)
    got = kernels.attend(q, keys, values, mask)
    assert got.abs().max() < 10
    torch.testing.assert_close(got, attend_one(q, keys, values, mask), rtol=2e-2, atol=1e-2)


def test_attend_takes_only_the_layout_it_reads(built):
    keys, values = _cache_views(1, 4, 20, 32, 10)
    q = torch.randn(1, 4, 1, 32).to(torch.bfloat16)
    assert kernels.attends(q, keys, values)
    assert not kernels.attends(q, keys, values.contiguous())  # values by row
    assert not kernels.attends(q, keys.transpose(-1, -2).contiguous().transpose(-1, -2), values)  # keys by column
    grouped = torch.randn(1, 8, 1, 32).to(torch.bfloat16)  # two query heads per KV head
    assert kernels.attends(grouped, keys, values) == (built[1] == "avx2")
    assert not kernels.attends(torch.randn(1, 6, 1, 32).to(torch.bfloat16), keys, values)  # not whole groups
    assert not kernels.attends(q.float(), keys.float(), values.float())
    assert not kernels.attends(torch.randn(1, 4, 2, 32).to(torch.bfloat16), keys, values)  # two queries


def _ulps_apart(got: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """How many bf16 steps apart two bf16 tensors of the same signs are, element by element."""
    return (got.view(torch.int16).int() - expected.view(torch.int16).int()).abs()


@pytest.mark.parametrize(("rows", "width"), [(1, 1024), (5, 200), (300, 64)])
def test_rmsnorm_equals_the_layer(built, rows, width):
    """`RMSNorm`'s formula in one call: at most one bf16 step off (the mean's sums in another order),
    and that rarely; the weight multiplies."""
    torch.manual_seed(width)
    norm = RMSNorm(width, 1e-5)
    norm.weight.data = torch.rand(width) * 2 + 0.5
    norm = norm.to(torch.bfloat16)
    x = (torch.randn(rows, width) * 3).to(torch.bfloat16)
    with torch.no_grad():
        got = kernels.rmsnorm(x, norm.weight, norm.eps)
        x32 = x.float()  # the layer's own arithmetic, written out (the layer itself would call the kernel)
        expected = (norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps))).to(torch.bfloat16)
    apart = _ulps_apart(got, expected)
    assert apart.max() <= 1 and (apart > 0).float().mean() < 0.01, apart.float().mean()


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2)])
@pytest.mark.parametrize("freq_dtype", [torch.float32, torch.bfloat16])
def test_rope_store_equals_rotary_and_cache_writes(built, heads, kv_heads, freq_dtype):
    """Each row's query and key rotated by its position as `apply_rotary` does in bf16 (the
    frequencies in fp32, or bf16 as in a model cast whole), then its key and value written at its
    own column of a cache of keys by row and values by column, nothing else of the cache touched."""
    torch.manual_seed(heads)
    b, head_dim, length = 3, 64, 40
    rotary = RotaryEmbedding(head_dim, 10000.0).to(freq_dtype)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(b, 1, width).to(torch.bfloat16)
    positions = torch.tensor([[0], [7], [1300]])
    index = torch.tensor([2, 5, 39])
    keys = torch.randn(b, kv_heads, length, head_dim).to(torch.bfloat16)
    values = torch.randn(b, kv_heads, head_dim, length).to(torch.bfloat16).transpose(-1, -2)  # by column
    q, k, v = (
        part.view(b, 1, -1, head_dim).transpose(1, 2)
        for part in qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    )
    cos, sin = rotary(positions, torch.bfloat16)
    expected_q, expected_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    expected_keys, expected_values = keys.clone(), values.clone()
    rows = torch.arange(b)
    expected_keys[rows, :, index] = expected_k[:, :, 0]
    expected_values[rows, :, index] = v[:, :, 0]

    with torch.no_grad():
        assert kernels.stores(qkv, rotary.inv_freq, keys, values)
        kernels.rope_store(qkv, positions, rotary.inv_freq, keys, values, index, heads, kv_heads)
    got_q = qkv[..., : heads * head_dim].view(b, 1, heads, head_dim).transpose(1, 2)
    assert torch.equal(got_q, expected_q)
    assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)


@torch.no_grad()
def test_rope_store_takes_only_what_it_writes(built):
    keys = torch.zeros(1, 2, 8, 64, dtype=torch.bfloat16)
    qkv = torch.zeros(1, 1, 6 * 64, dtype=torch.bfloat16)
    inv_freq = RotaryEmbedding(64, 10000.0).inv_freq
    assert kernels.stores(qkv, inv_freq, keys, keys)
    assert not kernels.stores(torch.zeros(1, 2, 6 * 64, dtype=torch.bfloat16), inv_freq, keys, keys)  # two tokens
    assert not kernels.stores(qkv.float(), inv_freq, keys.float(), keys.float())
    assert not kernels.stores(torch.zeros(1, 1, 12 * 64, dtype=torch.bfloat16)[..., ::2], inv_freq, keys, keys)
    with torch.enable_grad():
        assert not kernels.stores(qkv, inv_freq, keys, keys)  # under autograd PyTorch's ops serve


def test_bf16_decoding_with_the_layer_kernels_answers_as_pytorchs_ops(
    built, reference_model, reference_tokenizer, monkeypatch
):
    """A bf16 model's greedy answers, two rows of different lengths each decoding at its own column:
    the same with the norm and rotary-and-store kernels as with PyTorch's ops in their place."""
    import copy

    from cogvlm.pipeline import Pipeline

    vlm = Pipeline(copy.deepcopy(reference_model).to(torch.bfloat16), reference_tokenizer)
    requests = [{"query": "Describe the picture in detail."}, {"query": "Hi"}]
    used = {"normalises": 0, "stores": 0}

    def counted(name):
        takes = getattr(kernels, name)

        def check(*args):
            used[name] += takes(*args)
            return takes(*args)

        return check

    for name in used:
        monkeypatch.setattr(kernels, name, counted(name))
    with_kernels = vlm.batch(requests, max_new_tokens=24)
    assert used["normalises"] > 0 and used["stores"] > 0
    for name in used:
        monkeypatch.setattr(kernels, name, lambda *a: False)
    assert vlm.batch(requests, max_new_tokens=24) == with_kernels


def _decoder_layer(kv_heads, freq_dtype):
    """A packed bf16 decoder layer (8 query heads of 16) with non-trivial norms, and a random cache
    of 3 slots x 40 columns, keys by row and values by column."""
    from cogvlm.model.decoder import CogVLMDecoderLayer

    config = dataclasses.replace(
        get_preset("tiny"),
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=8,
        num_multi_query_heads=kv_heads,
    )
    layer = CogVLMDecoderLayer(config)
    with torch.no_grad():
        for linear in layer.modules():
            if isinstance(linear, nn.Linear):
                linear.weight.normal_(0, 0.1)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.uniform_(0.5, 2.0)
    layer = layer.to(torch.bfloat16).eval()
    layer.self_attn.rotary_emb.inv_freq = layer.self_attn.rotary_emb.inv_freq.to(freq_dtype)
    pack_linears(layer)
    keys = torch.randn(3, kv_heads, 40, 16).to(torch.bfloat16)
    values = torch.randn(3, kv_heads, 16, 40).to(torch.bfloat16).transpose(-1, -2)  # by column
    return layer, keys, values


@pytest.mark.parametrize("kv_heads", [8, 2])
@pytest.mark.parametrize("freq_dtype", [torch.float32, torch.bfloat16])
def test_decode_layer_equals_the_layers_modules(built, kv_heads, freq_dtype):
    """A decode step of three rows, each at its own position and column with its own mask, in one
    call: the layer's output is what its modules give one by one through the same kernels (SiLU's exp
    aside: at most one bf16 step, rarely), and the cache the same to the bit."""
    from cogvlm.model.decoder import RowIndexedCache

    torch.manual_seed(kv_heads)
    layer, keys, values = _decoder_layer(kv_heads, freq_dtype)
    if kv_heads != 8 and not kernels.attends_grouped():
        pytest.skip("grouped heads go to oneDNN on this build (kernels.attends_grouped)")
    x = (torch.randn(3, 1, 128) * 4).to(torch.bfloat16)
    positions, index = torch.tensor([[3], [29], [1300]]), torch.tensor([3, 29, 12])
    mask = torch.rand(3, 1, 1, 40) > 0.4
    mask[torch.arange(3), 0, 0, index] = True

    def step(fused):
        cache = RowIndexedCache(keys.clone(), values.clone(), index, mask)
        with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
            if not fused:
                patch.setattr(kernels, "decodes", lambda *a: False)
            else:
                assert kernels.decodes(layer.decode_kernel(), x, cache.keys, cache.values)
            return layer(x, positions, None, None, False, cache), cache

    (got, got_cache), (expected, expected_cache) = step(True), step(False)
    assert torch.equal(got_cache.keys, expected_cache.keys) and torch.equal(got_cache.values, expected_cache.values)
    apart = _ulps_apart(got, expected)
    assert apart.max() <= 1 and (apart > 0).float().mean() < 0.02, apart.float().mean()


@torch.no_grad()
def test_decode_layer_takes_only_what_it_computes(built):
    layer, keys, values = _decoder_layer(8, torch.float32)
    fused = layer.decode_kernel()
    x = torch.randn(3, 1, 128).to(torch.bfloat16)
    assert kernels.decodes(fused, x, keys, values)
    assert not kernels.decodes(fused, torch.randn(3, 2, 128).to(torch.bfloat16), keys, values)  # two tokens a row
    assert not kernels.decodes(fused, x.float(), keys.float(), values.float())
    assert not kernels.decodes(fused, x, keys, values.contiguous())  # values by row
    plain = dataclasses.replace(fused, products=(nn.Linear(128, 384), *fused.products[1:]))  # a product not packed
    assert not kernels.decodes(plain, x, keys, values)
    layer.mlp.language_mlp.hidden_act = "gelu"
    assert layer.decode_kernel() is None
    with torch.enable_grad():
        assert not kernels.decodes(fused, x, keys, values)  # under autograd PyTorch's ops serve


@torch.no_grad()
def test_decode_kernel_is_kept_while_the_layer_holds_the_same_weights(built):
    """Kept between steps; a copy of the layer, or the layer cast, gets its own (the addresses the
    kernel reads are its own weights', never the ones it had)."""
    import copy

    layer, keys, values = _decoder_layer(8, torch.float32)
    kept = layer.decode_kernel()
    assert layer.decode_kernel() is kept
    twin = copy.deepcopy(layer)
    assert twin.decode_kernel() is not kept
    assert twin.decode_kernel().weights.qkv == twin.self_attn.language_expert_query_key_value.weight.data_ptr()
    layer.to(torch.float32)  # the norms' data swapped in place: the same Parameters, new addresses
    cast = layer.decode_kernel()
    assert cast is not kept and cast.weights is None
    assert not kernels.decodes(cast, torch.randn(3, 1, 128).to(torch.bfloat16), keys, values)


@pytest.mark.parametrize("isa", sorted(kernels.ISA_FLAGS))
def test_kernels_build_for_every_instruction_set(isa, tmp_path):
    """Each instruction set's half of kernels.c compiles, whichever this CPU runs (a CPU that runs
    the other builds it on first use)."""
    try:
        kernels._compile(os.environ.get("CC", "cc"), (*kernels.FLAGS, *kernels.ISA_FLAGS[isa]), str(tmp_path / "k.so"))
    except (OSError, subprocess.SubprocessError) as err:
        if isinstance(err, FileNotFoundError):
            pytest.skip("no C compiler here")
        raise
    assert (tmp_path / "k.so").stat().st_size > 0


def test_packed_bf16_decoding_in_one_call_a_layer_answers_as_the_layers_modules(
    built, reference_model, reference_tokenizer, monkeypatch
):
    """A packed bf16 model (as `cogvlm.load` makes it on the CPU) answers two prompts of different
    lengths the same whether each decode step runs a layer in one call or module by module."""
    import copy

    from cogvlm.pipeline import Pipeline

    model = copy.deepcopy(reference_model).to(torch.bfloat16)
    pack_linears(model)
    vlm = Pipeline(model, reference_tokenizer)
    requests = [{"query": "Describe the picture in detail."}, {"query": "Hi"}]
    calls, decode_layer = [], kernels.decode_layer
    monkeypatch.setattr(kernels, "decode_layer", lambda *a: calls.append(1) or decode_layer(*a))
    in_one_call = vlm.batch(requests, max_new_tokens=24)
    assert len(calls) >= 23 * model.config.num_hidden_layers
    monkeypatch.setattr(kernels, "decodes", lambda *a: False)
    assert vlm.batch(requests, max_new_tokens=24) == in_one_call
