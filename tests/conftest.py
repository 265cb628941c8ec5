"""Shared fixtures: the official reference-tiny checkpoint and its recorded outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist (`.ci/run`: two workers on CI's two cores) each worker computes on one thread, so
# that the two never fight over the cores; alone, the suite uses two.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))

REFERENCE = Path(__file__).parent / "fixtures" / "reference-tiny"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE


@pytest.fixture(scope="session")
def reference_cases() -> dict:
    return json.loads((REFERENCE / "cases.json").read_text())["cases"]


@pytest.fixture(scope="session")
def reference_tensors() -> dict[str, torch.Tensor]:
    return load_file(REFERENCE / "cases.safetensors")


@pytest.fixture(scope="session")
def reference_model():
    from cogvlm import CogVLMForCausalLM

    return CogVLMForCausalLM.from_pretrained(REFERENCE)


@pytest.fixture(scope="session")
def reference_tokenizer():
    from cogvlm import load_tokenizer

    return load_tokenizer(REFERENCE)


@pytest.fixture
def one_thread():
    """Tiny matrices: threads only add contention on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- hub_cache: the official repo names in a Hugging Face hub cache, built from the shipped model ----
@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory) -> Path:
    """An HF_HUB_CACHE folder holding THUDM/cogvlm-chat-hf (the shipped tiny-shapes model as the official
    repos publish it: 8 safetensors shards + index, remote-code .py files, no tokenizer) and
    lmsys/vicuna-7b-v1.5 (tiny-shapes' tokenizer), downloaded once from a fake hub (tests/hubfake.py).

    Read-only: use it with HF_HUB_OFFLINE=1 HF_HUB_CACHE=<it> in a subprocess's env (e.g.
    `cogvlm ask --model THUDM/cogvlm-chat-hf ...`), or `hubfake.point_hub(monkeypatch, hubfake.closed_endpoint(),
    hub_cache, offline=True)` in this process.
    """
    from hubfake import build_hub_cache

    return build_hub_cache(tmp_path_factory.mktemp("hub"))


# ---- reference-cogvlm2-tiny: the official CogVLM2 code's outputs on a tiny random CogVLM2 ----
COGVLM2 = Path(__file__).parent / "fixtures" / "reference-cogvlm2-tiny"


@pytest.fixture(scope="session")
def cogvlm2_dir() -> Path:
    return COGVLM2


@pytest.fixture(scope="session")
def cogvlm2_cases() -> dict:
    return json.loads((COGVLM2 / "cases.json").read_text())["cases"]


@pytest.fixture(scope="session")
def cogvlm2_tensors() -> dict[str, torch.Tensor]:
    return load_file(COGVLM2 / "cases.safetensors")


@pytest.fixture(scope="session")
def cogvlm2_model():
    """Loaded once per session (66 MB fp32); tests must not change it."""
    from cogvlm import CogVLMForCausalLM

    return CogVLMForCausalLM.from_pretrained(COGVLM2)
