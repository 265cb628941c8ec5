"""From-scratch tokenizers: a Vicuna-layout SentencePiece folder trained on synthetic texts."""

from __future__ import annotations

from cogvlm import load_tokenizer
from cogvlm.synthetic import corpus
from cogvlm.tokenizer_train import train_sentencepiece


def test_trained_tokenizer_round_trips_and_splits_digits(tmp_path):
    train_sentencepiece(corpus(seed=0, n=200), tmp_path / "a", vocab_size=400)
    tok = load_tokenizer(tmp_path / "a")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    answer = "a red circle[[120,340,310,560]] and\na star ü"
    assert tok.decode(tok.encode(answer)) == answer
    digits = [tok.decode([i]) for i in tok.encode("[[120,340,310,560]]")]
    assert all(len(piece) == 1 for piece in digits if piece.isdigit()) and "1" in digits
    # Deterministic: the same texts give the same model file.
    train_sentencepiece(corpus(seed=0, n=200), tmp_path / "b", vocab_size=400)
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == (tmp_path / "b" / "tokenizer.model").read_bytes()
