"""Tokenizer loading: SentencePiece as LlamaTokenizer(legacy=True), and tokenizer.json."""

from __future__ import annotations

import pytest

from cogvlm import CheckpointError, load_tokenizer

TEXTS = [
    "Question: What color is the star? Short answer:",
    "  leading spaces and   runs",
    "hello</s>world",
    "<s>start and unk <unk> here",
    "émoji 🙂 and 中文",
    "",
    "\nnew\nlines\n",
    "A chat between a curious user and an artificial intelligence assistant. USER: hi ASSISTANT:",
]


def test_special_ids(reference_tokenizer):
    tok = reference_tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (1, 2, 0, 0)


def test_encodes_as_legacy_llama_tokenizer(reference_dir, reference_tokenizer):
    """transformers 4.35's LlamaTokenizer(legacy=True), the tokenizer the official outputs were made
    with, splits the text on special-token strings and runs SentencePiece on each other span.
    (transformers 5 has no SentencePiece-backed slow tokenizer any more; its converted fast one
    ignores this model's normaliser, so it is not the reference. The fixture's prompts are.)"""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(reference_dir / "tokenizer.model"))
    assert reference_tokenizer.encode("x </s> y") == sp.encode("x ") + [2] + sp.encode(" y")
    assert reference_tokenizer.encode("<s>a<unk>b") == [1] + sp.encode("a") + [0] + sp.encode("b")
    for text in TEXTS:
        if not any(special in text for special in ("<s>", "</s>", "<unk>")):
            assert reference_tokenizer.encode(text) == sp.encode(text), text
            assert reference_tokenizer.decode(sp.encode(text)) == sp.decode(sp.encode(text))


def test_special_strings_become_ids(reference_tokenizer):
    ids = reference_tokenizer.encode("hi</s>")
    assert ids[-1] == 2
    assert reference_tokenizer.encode("x", add_special_tokens=True)[0] == 1


def test_decode_round_trip(reference_tokenizer):
    for text in ("What color is the star?", "a red circle[[120,340,310,560]]"):
        assert reference_tokenizer.decode(reference_tokenizer.encode(text)) == text


def test_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode("hello world") == [3, 4]
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 0)
    assert loaded.encode("hello</s>") == [3, 2]


def test_missing_tokenizer(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.model or tokenizer.json"):
        load_tokenizer(tmp_path)
