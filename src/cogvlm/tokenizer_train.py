"""Train a small SentencePiece tokenizer folder in the Vicuna layout (for from-scratch models).

The result loads like Vicuna's: `tokenizer.model` with unk 0, bos 1, eos 2, pad = unk, BPE
with byte fallback (any text encodes), digits split one per token (box coordinates stay
compositional), no whitespace normalisation (newlines and spaces survive a round trip).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable

from .fileio import write_json


def train_sentencepiece(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512) -> Path:
    """Write tokenizer.model, tokenizer_config.json and special_tokens_map.json into out_dir."""
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        num_threads=1,
        max_sentence_length=4096,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(buffer.getvalue())
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    write_json(out / "special_tokens_map.json", special)
    write_json(
        out / "tokenizer_config.json",
        {**special, "tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True, "add_eos_token": False},
    )
    return out


__all__ = ["train_sentencepiece"]
