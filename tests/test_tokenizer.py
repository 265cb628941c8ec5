"""Tokenizer loading: SentencePiece as LlamaTokenizer(legacy=True), and tokenizer.json."""

from __future__ import annotations

import pytest

from cogvlm import CheckpointError, load_tokenizer


def test_special_ids(reference_tokenizer):
    tok = reference_tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (1, 2, 0, 0)


#: The oracle: ids and decoded text of the reference tokenizer.model (the fixture's tiny Vicuna-layout
#: model: BPE, byte fallback, the nmt_nfkc normaliser) as transformers 4.x `LlamaTokenizer(legacy=True)`
#: encodes, the tokenizer the official outputs were made with (tokenizer_config.json: "legacy": true).
#: transformers 5 has no such class any more: its `LlamaTokenizer` is the converted fast tokenizer, which
#: ignores this model's normaliser ("\nnew\nlines\n" -> [557, 13, 289, ...], not [296, ...]), so the ids
#: are recorded here. They were computed by `legacy_llama_ids` below (sentencepiece 0.2's
#: `encode(span, out_type=str)` and `piece_to_id`, plus the documented legacy rules, written from
#: transformers 4.x's source, not from src/cogvlm/tokenizer.py) and cross-checked, all equal, with
#: transformers 5.25's `SentencePieceBackend(vocab_file=..., legacy=True)`, the slow path that remains.
#: The decoded text is the text as the normaliser leaves each span between special tokens (NFKC, any
#: whitespace run one space, none at a span's ends), the special tokens as their strings. (transformers
#: 4.x's legacy decode also put a space at the front before a special token that follows text,
#: " hello</s>world", and after one that starts the ids, "<s> start"; those quirks are not kept.)
ORACLE = [
    ("Question: What color is the star? Short answer:", [280, 570, 320, 388, 278, 261, 423, 579, 310, 305, 570], None),
    ("hello</s>world", [547, 2, 323, 282, 571, 578], None),
    ("<s>start and unk <unk> here", [1, 423, 559, 495, 557, 567, 352, 0, 557, 374], "<s>start and unk<unk>here"),
    ("x </s> y", [557, 593, 2, 353], "x</s>y"),
    ("</s></s><s>", [2, 2, 1], None),
    ("  leading spaces and   runs  ", [461, 398, 562, 429, 295, 575, 355, 265, 495, 474], "leading spaces and runs"),
    ("a\tb\n\nc", [263, 272, 281], "a b c"),
    ("\nnew\nlines\n", [296, 572, 391, 565, 265], "new lines"),
    ("café", [281, 563, 582, 198, 172], None),
    ("naïve Ünïcode", [557, 565, 563, 198, 178, 589, 558, 557, 198, 159, 565, 198, 178, 569, 566, 578, 558], None),
    ("中文 and 汉字", [557, 231, 187, 176, 233, 153, 138, 495, 557, 233, 180, 140, 232, 176, 154], None),
    ("emoji 🙂🎉!", [557, 558, 581, 566, 591, 562, 557, 243, 162, 156, 133, 243, 162, 145, 140, 36], None),
    (
        "digits 0123456789 and 3.14",
        [331, 562, 574, 393, 557, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 495, 557, 54, 568, 52, 55],
        None,
    ),
    (
        "a red circle[[120,340,310,560]]",
        [263, 351, 427, 94, 94, 52, 53, 51, 594, 54, 55, 51, 594, 54, 52, 51, 594, 56, 57, 51, 96, 96],
        None,
    ),
    ("", [], None),
    ("<s", [557, 63, 561], None),  # not a special token: plain text
    ("ﬁ ① Ｘ", [451, 562, 557, 52, 557, 91], "fi 1 X"),  # NFKC
]  # (text, ids, decoded text when it is not the text itself)

#: The special-token strings and their ids, as the fixture's tokenizer_config.json names them.
SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2}


def legacy_llama_ids(sp, text: str) -> list[int]:
    """transformers 4.x `LlamaTokenizer(legacy=True).encode(text, add_special_tokens=False)`, by its rules: the
    special-token strings are cut out of the text (the leftmost first, the longest at one place) and become
    their ids; each non-empty span between them is tokenized by SentencePiece alone, so each gets
    SentencePiece's own dummy-prefix space (legacy=True adds and strips nothing), and its pieces become ids."""
    ids: list[int] = []
    rest = text
    while rest:
        found = [(rest.find(s), -len(s), s) for s in SPECIALS if s in rest]
        at, _, special = min(found) if found else (len(rest), 0, None)
        ids += [sp.piece_to_id(piece) for piece in sp.encode(rest[:at], out_type=str)] if at else []
        if special is None:
            break
        ids.append(SPECIALS[special])
        rest = rest[at + len(special) :]
    return ids


def test_oracle_ids_follow_the_legacy_rules(reference_dir):
    """The recorded ids are what the legacy rules give with this sentencepiece (so a sentencepiece
    that tokenizes differently is noticed here, not as a wrapper bug)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(reference_dir / "tokenizer.model"))
    for text, ids, _ in ORACLE:
        assert legacy_llama_ids(sp, text) == ids, text


@pytest.mark.parametrize("text, ids, decoded", ORACLE)
def test_encodes_and_decodes_as_the_oracle(reference_tokenizer, text, ids, decoded):
    assert reference_tokenizer.encode(text) == ids
    assert reference_tokenizer.encode(text, add_special_tokens=True) == [1, *ids]
    assert reference_tokenizer.decode(ids) == (text if decoded is None else decoded)


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


@pytest.mark.parametrize(("text", "skipped"), [("hello</s>world", "hello world"), ("x </s> y", "x y")])
def test_skipping_special_tokens_keeps_the_space_after_them(reference_tokenizer, text, skipped):
    """LlamaTokenizer decodes what is left as one run: the word after </s> keeps its space."""
    assert reference_tokenizer.decode(reference_tokenizer.encode(text), skip_special_tokens=True) == skipped
