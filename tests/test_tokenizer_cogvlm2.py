"""CogVLM2's Llama-3 tokenizer (tokenizer.json): the official prompt ids and decodes of the
reference-cogvlm2-tiny fixture, its special ids, and transformers' fast tokenizer as an oracle."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file

from cogvlm import load_tokenizer
from cogvlm.tokenizer import copy_tokenizer_files, stop_token_ids

COGVLM2 = Path(__file__).parent / "fixtures" / "reference-cogvlm2-tiny"
#: Special-token strings in text, whitespace runs, newlines, non-ASCII (bytes: only 558 learned ids).
TEXTS = [
    "Question: What color is the star? Answer:",
    "hello<|eot_id|>world<|end_of_text|>",
    "<|begin_of_text|><|reserved_special_token_0|> x <|reserved_special_token_250|>",
    "a <|eot_id|> b<|eot_id|><|eot_id|>",
    "<|eot_id",  # not a special token: plain text
    "  leading spaces and   runs\t\ttabs   ",
    "\nnew\n\nlines\r\n\n \n",
    "émoji 🙂 and 中文, 日本語 ok",
    "你好，世界！这是一个测试。",
    "numbers 1234567 and 3.14159, can't won't I'll",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(COGVLM2)


@pytest.fixture(scope="module")
def cases() -> dict:
    return json.loads((COGVLM2 / "cases.json").read_text())


@pytest.fixture(scope="module")
def tensors() -> dict:
    return load_file(COGVLM2 / "cases.safetensors")


def test_special_ids(tok):
    """bos and eos as tokenizer_config.json names them; pad 128002 from config.json (the tokenizer
    files name none; the official code sets it); both eos ids of generation_config.json."""
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (128000, 128001, 128002, None)
    assert tok.eos_token_ids == (128001, 128009)
    assert stop_token_ids(tok) == {128001, 128009}
    assert [tok.decode([i]) for i in (128000, 128001, 128002, 128009)] == [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|eot_id|>",
    ]


def test_no_special_tokens_added(tok):
    assert tok.encode("hi") == [tok.encode("hi", add_special_tokens=True)[1]]
    assert tok.encode("hi", add_special_tokens=True)[0] == 128000


def test_special_strings_in_text_become_their_ids(tok):
    ids = tok.encode("hi<|eot_id|>there<|reserved_special_token_0|>")
    assert ids == tok.encode("hi") + [128009] + tok.encode("there") + [128002]
    assert 128009 not in tok.encode("<|eot_id")


def test_fixture_prompts(tok, cases, tensors):
    """Every official prompt: [bos] + image placeholders (pad id, token type 1) + the prompt text."""
    image_tokens = cases["image_tokens"]
    for name, case in cases["cases"].items():
        for row, member in enumerate(case["members"]):
            mask = tensors[f"{name}.attention_mask"][row].bool()
            ids = tensors[f"{name}.input_ids"][row][mask].tolist()
            types = tensors[f"{name}.token_type_ids"][row][mask].tolist()
            n = image_tokens if member["image"] else 0
            text = tok.encode(member["prompt"])
            assert ids == [tok.bos_token_id] + [tok.pad_token_id] * n + text, name
            assert types == [0] + [1] * n + [0] * len(text), name


def test_fixture_decodes(tok, cases, tensors):
    for name, case in cases["cases"].items():
        for row, expected in enumerate(case["decoded_new"]):
            assert tok.decode(tensors[f"{name}.new_tokens"][row]) == expected, name


def test_chinese_round_trips_through_byte_tokens(tok):
    text = "你好，世界！这是一个测试。🙂"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # characters split over byte tokens


def test_matches_transformers_fast_tokenizer(tok):
    """transformers' PreTrainedTokenizerFast on the same file, as the official code loads it."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(COGVLM2 / "tokenizer.json"))
    for text in TEXTS:
        ids = hf.encode(text, add_special_tokens=False)
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == hf.decode(ids, clean_up_tokenization_spaces=False) == text, text
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )


def test_stop_token_ids_from_any_tokenizer_and_config():
    """A transformers tokenizer knows one eos; the model config adds the rest."""
    plain = SimpleNamespace(eos_token_id=128001)
    assert stop_token_ids(plain) == {128001}
    assert stop_token_ids(plain, SimpleNamespace(eos_token_ids=(128001, 128009), eos_token_id=128001)) == {
        128001,
        128009,
    }
    assert stop_token_ids(plain, SimpleNamespace(eos_token_id=[128001, 128009])) == {128001, 128009}
    assert stop_token_ids(SimpleNamespace(eos_token_id=None), SimpleNamespace(eos_token_id=2)) == {2}


def test_ids_the_tokenizer_files_leave_out(tmp_path):
    """generation_config.json, else config.json, give the eos list and the pad id; a pad token named
    by the tokenizer files wins; without any, there is no pad id (Llama-3 has no unk either)."""

    def ids() -> tuple:
        tok = load_tokenizer(tmp_path)
        return tok.pad_token_id, tok.eos_token_ids

    copy_tokenizer_files(COGVLM2, tmp_path)
    assert ids() == (None, (128001,))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [128001, 128008], "pad_token_id": 128003}))
    assert ids() == (128003, (128001, 128008))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128009, 128001]}))
    assert ids() == (128003, (128001, 128009))  # eos_token_id first; the pad id from config.json
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|reserved_special_token_5|>"}))
    assert ids() == (128010, (128001, 128009))
