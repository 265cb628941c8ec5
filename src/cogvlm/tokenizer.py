"""Tokenizers from a folder: `tokenizer.model` (SentencePiece) or `tokenizer.json` (tokenizers).

- SentencePiece (CogVLM-1's Vicuna tokenizer) encodes as the official `LlamaTokenizer(legacy=True)`:
  special-token strings in the text become their ids, every other span goes through SentencePiece
  as is (with its dummy-prefix space).
- `tokenizer.json` (CogVLM2's Llama-3 tokenizer) is the `tokenizers` library's job end to end, as in
  transformers' fast tokenizer: special tokens written in the text (`<|eot_id|>`) become their ids,
  and decode back to their strings unless skipped. Neither adds bos unless asked (the official code
  adds it by hand).

bos/eos/unk/pad are named by tokenizer_config.json and special_tokens_map.json. What those leave
out is read, as transformers' `generate` reads it, from the folder's generation_config.json (else
config.json) when the folder has one: the pad id when no pad token is named (CogVLM2: 128002, which
Llama-3's tokenizer files do not name), and `eos_token_ids`, every id that ends an answer (CogVLM2:
`<|end_of_text|>` 128001 and `<|eot_id|>` 128009; `eos_token_id` stays the first).

Any object with `encode(text, add_special_tokens=False)`, `decode(ids)`, `bos_token_id`,
`eos_token_id` and `pad_token_id` (a transformers tokenizer, say) can be used wherever this package
takes a tokenizer; `stop_token_ids` gives the ids that end an answer for any of them.
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
#: Where the ids the tokenizer files leave out come from, first file first (as transformers' generate).
_ID_FILES = ("generation_config.json", "config.json")


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> None:
    """Copy whichever tokenizer files `src` has into `dst`, so `dst` loads on its own."""
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not valid JSON") from None


def _special_names(folder: Path) -> dict[str, str]:
    """bos/eos/unk (and pad, when named) token strings from tokenizer_config.json and special_tokens_map.json."""
    names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        if not (folder / file).is_file():
            continue
        data = _read_json(folder / file)
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                names[key] = value
    return names


def _as_ids(value: Any) -> tuple[int, ...]:
    """An id field as a tuple: transformers writes one id or a list (CogVLM2's eos)."""
    if value is None:
        return ()
    return (int(value),) if isinstance(value, int) else tuple(int(i) for i in value)


def _folder_ids(folder: Path, key: str) -> tuple[int, ...]:
    """`key` (eos_token_id, pad_token_id) from the first of the folder's model config files that sets it."""
    for file in _ID_FILES:
        data = _read_json(folder / file) if (folder / file).is_file() else None
        if isinstance(data, dict):
            ids = _as_ids(data.get(key))
            if ids:
                return ids
    return ()


def stop_token_ids(tokenizer: Any, config: Any = None) -> frozenset[int]:
    """Every id that ends an answer: the tokenizer's eos ids and the model config's.

    transformers' `generate` stops at any eos id of the generation config, and CogVLM2 lists two
    (128001 ends a text, 128009 a turn). Tokenizers without `eos_token_ids` (transformers' own)
    contribute their `eos_token_id`; a config contributes `eos_token_ids`, else `eos_token_id`.
    """
    ids = {*_as_ids(getattr(tokenizer, "eos_token_ids", None)), *_as_ids(tokenizer.eos_token_id)}
    if config is not None:
        ids.update(_as_ids(getattr(config, "eos_token_ids", None) or config.eos_token_id))
    return frozenset(ids)


class Tokenizer:
    """Text <-> ids over a backend, with the special ids prompts, batches and generation need.

    `encode(text)` and `decode(ids, skip_special_tokens)` come from the backend; `special` maps
    the special-token strings it knows to their ids, `names` the roles to strings. `more_eos` are
    the other ids that end an answer; `pad_id` is the pad id when `names` has no pad token (else unk).
    """

    def __init__(
        self,
        encode: Callable[[str], list[int]],
        decode: Callable[[list[int], bool], str],
        special: dict[str, int],
        names: dict[str, str],
        more_eos: Sequence[int] = (),
        pad_id: int | None = None,
    ) -> None:
        self._encode, self._decode = encode, decode
        self.bos_token_id = special.get(names["bos_token"])
        self.eos_token_id = special.get(names["eos_token"])
        self.unk_token_id = special.get(names["unk_token"])
        self.pad_token_id = special.get(names.get("pad_token", ""), self.unk_token_id if pad_id is None else pad_id)
        eos = [i for i in (self.eos_token_id, *more_eos) if i is not None]
        self.eos_token_ids = tuple(dict.fromkeys(eos))  # eos_token_id first, no repeats

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; with add_special_tokens, bos first (as LlamaTokenizer)."""
        ids = self._encode(text)
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int] | Any, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list or a tensor); special tokens as their strings unless skipped."""
        return self._decode([int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)], skip_special_tokens)


def _sentencepiece(path: Path, names: dict[str, str]) -> tuple[Callable, Callable, dict[str, int]]:
    """LlamaTokenizer(legacy=True) over a SentencePiece model: the named special tokens are split
    out of the text and decoded as their strings; each span between them goes through SentencePiece."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError):
        raise CheckpointError(f"{path}: not a SentencePiece model") from None
    unk = sp.id_to_piece(sp.unk_id())
    special = {s: sp.piece_to_id(s) for s in set(names.values()) if sp.piece_to_id(s) != sp.unk_id() or s == unk}
    strings = {i: s for s, i in special.items()}
    splitter = re.compile("(" + "|".join(map(re.escape, sorted(special, key=len, reverse=True))) + ")")

    def encode(text: str) -> list[int]:
        ids: list[int] = []
        for span in splitter.split(text) if special else [text]:
            if span in special:
                ids.append(special[span])
            elif span:
                ids.extend(sp.encode(span))
        return ids

    def decode(ids: list[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:  # one run, as LlamaTokenizer does: "a</s>b" -> "a b", not "ab"
            return sp.decode([i for i in ids if i not in strings])
        out, run = [], []
        for i in ids:
            if i in strings:
                out += [sp.decode(run), strings[i]]
                run = []
            else:
                run.append(i)
        out.append(sp.decode(run))
        return "".join(out)

    return encode, decode, special


def _tokenizers(path: Path) -> tuple[Callable, Callable, dict[str, int]]:
    """A `tokenizer.json` through the `tokenizers` library; its special tokens are its added tokens
    marked special (Llama-3: the 256 ids from 128000)."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception:
        raise CheckpointError(f"{path}: not a tokenizers file") from None
    special = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    return (
        lambda text: tok.encode(text, add_special_tokens=False).ids,
        lambda ids, skip: tok.decode(ids, skip_special_tokens=skip),
        special,
    )


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """Load `tokenizer.model` (SentencePiece) or else `tokenizer.json` from a folder."""
    folder = Path(folder)
    names = _special_names(folder)
    if (folder / "tokenizer.model").is_file():
        backend = _sentencepiece(folder / "tokenizer.model", names)
    elif (folder / "tokenizer.json").is_file():
        backend = _tokenizers(folder / "tokenizer.json")
    else:
        raise CheckpointError(f"{folder}: no tokenizer.model or tokenizer.json")
    pad = _folder_ids(folder, "pad_token_id")
    return Tokenizer(*backend, names, _folder_ids(folder, "eos_token_id"), pad[0] if pad else None)
