"""Tokenizers from a folder: `tokenizer.model` (SentencePiece) or `tokenizer.json` (tokenizers).

The SentencePiece path encodes as the official `LlamaTokenizer(legacy=True)` does for Vicuna:
special-token strings in the text become their ids, every other span goes through
SentencePiece as is (with its dummy-prefix space). Any object with `encode(text,
add_special_tokens=False)`, `decode(ids)`, `bos_token_id`, `eos_token_id` and `pad_token_id`
(a transformers tokenizer, say) can be used wherever this package takes a tokenizer.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import CheckpointError

#: The files that make a tokenizer folder (copied along with exported or trained checkpoints).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> None:
    """Copy whichever tokenizer files `src` has into `dst`, so `dst` loads on its own."""
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)


def _special_names(folder: Path) -> dict[str, str]:
    """bos/eos/unk/pad token strings from tokenizer_config.json and special_tokens_map.json."""
    names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / file
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise CheckpointError(f"{path}: not valid JSON") from None
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                names[key] = value
    names.setdefault("pad_token", names["unk_token"])  # Vicuna: pad = <unk> = 0
    return names


class Tokenizer:
    """Text <-> ids over a backend; knows its special tokens and decodes them as strings."""

    def __init__(
        self,
        encode: Callable[[str], list[int]],
        decode: Callable[[list[int]], str],
        special: dict[str, int],
        names: dict[str, str],
        split_special: bool,
    ) -> None:
        self._encode, self._decode = encode, decode
        self.special_ids = {i: s for s, i in special.items()}
        self._split = (
            re.compile("(" + "|".join(map(re.escape, sorted(special, key=len, reverse=True))) + ")")
            if split_special and special
            else None
        )
        self.bos_token_id = special.get(names["bos_token"])
        self.eos_token_id = special.get(names["eos_token"])
        self.unk_token_id = special.get(names["unk_token"])
        self.pad_token_id = special.get(names["pad_token"], self.unk_token_id)
        self.special_names = names

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; with add_special_tokens, bos first (as LlamaTokenizer)."""
        ids: list[int] = []
        spans = self._split.split(text) if self._split else [text]
        for span in spans:
            if span in self._special_strings():
                ids.append(self.special_to_id(span))
            elif span:
                ids.extend(self._encode(span))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int] | Any, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; special tokens as their strings unless skipped."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        out, run = [], []
        for i in ids:
            if i in self.special_ids:
                out.append(self._decode(run))
                run = []
                if not skip_special_tokens:
                    out.append(self.special_ids[i])
            else:
                run.append(i)
        out.append(self._decode(run))
        return "".join(out)

    def _special_strings(self) -> set[str]:
        return set(self.special_ids.values())

    def special_to_id(self, token: str) -> int:
        return next(i for i, s in self.special_ids.items() if s == token)


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """Load `tokenizer.model` (SentencePiece) or else `tokenizer.json` from a folder."""
    folder = Path(folder)
    names = _special_names(folder)
    if (folder / "tokenizer.model").is_file():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(folder / "tokenizer.model"))
        except (OSError, RuntimeError):
            raise CheckpointError(f"{folder / 'tokenizer.model'}: not a SentencePiece model") from None
        special = {
            s: sp.piece_to_id(s)
            for s in set(names.values())
            if sp.piece_to_id(s) != sp.unk_id() or s == sp.id_to_piece(sp.unk_id())
        }
        return Tokenizer(lambda t: sp.encode(t), lambda ids: sp.decode(ids), special, names, split_special=True)
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception:
            raise CheckpointError(f"{folder / 'tokenizer.json'}: not a tokenizers file") from None
        special = {s: tok.token_to_id(s) for s in set(names.values()) if tok.token_to_id(s) is not None}
        return Tokenizer(
            lambda t: tok.encode(t, add_special_tokens=False).ids,
            lambda ids: tok.decode(ids, skip_special_tokens=False),
            special,
            names,
            split_special=False,
        )
    raise CheckpointError(f"{folder}: no tokenizer.model or tokenizer.json")
