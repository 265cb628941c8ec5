"""Shared fixtures: the official reference-tiny checkpoint and its recorded outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

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
