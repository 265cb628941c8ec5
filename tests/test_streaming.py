"""Streaming text: whole characters only, pieces that join to the one-shot decode, linear cost,
stop strings; for the CogVLM2 byte-level BPE, CogVLM-1's SentencePiece and any `decode(ids)`."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from cogvlm import load_tokenizer
from cogvlm.generation import GenerationConfig
from cogvlm.pipeline import Pipeline
from cogvlm.streaming import TextStream

COGVLM2 = Path(__file__).parent / "fixtures" / "reference-cogvlm2-tiny"
MIXED = "Chinese 中文字符 and emoji 🙂👍🏽 mixed: 你好，世界！ a  b\n\nend 😀"


@pytest.fixture(scope="module")
def llama3():
    return load_tokenizer(COGVLM2)


@pytest.fixture(params=["llama3", "sentencepiece"])
def any_tokenizer(request, llama3, reference_tokenizer):
    return llama3 if request.param == "llama3" else reference_tokenizer


class Counting:
    """A tokenizer that counts the ids it is asked to decode."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.calls, self.sizes = tokenizer, 0, []

    def decode(self, ids):
        self.calls += 1
        self.sizes.append(len(ids))
        return self.tokenizer.decode(ids)


def stream(tokenizer, ids, stop=()) -> tuple[list[str], TextStream]:
    s = TextStream(tokenizer, stop)
    pieces = []
    for i in ids:
        pieces.append(s.push(i))
        if s.stopped:
            break
    pieces.append(s.finish())
    return pieces, s


def test_only_whole_characters(llama3):
    ids = llama3.encode(MIXED)
    assert sum("\ufffd" in llama3.decode([i]) for i in ids) > 5  # byte tokens end mid-character
    pieces, s = stream(llama3, ids)
    assert "".join(pieces) == s.text == MIXED
    for piece in pieces:
        assert "\ufffd" not in piece
        assert piece.encode("utf-8").decode("utf-8") == piece  # valid text, no lone surrogates


def test_joins_to_the_one_shot_decode(any_tokenizer):
    """Random token sequences (special tokens, byte tokens, blank pieces, invalid bytes included):
    the pieces join to decode(ids), and no piece ends in a character still unfinished."""
    rng = random.Random(0)
    # SentencePiece: all 600 but unk/bos/eos; Llama-3: the 558 learned ids and some special ones
    vocab = [*range(558), *range(128000, 128012)] if any_tokenizer.bos_token_id == 128000 else list(range(3, 600))
    for _ in range(60):
        ids = [rng.choice(vocab) for _ in range(rng.randint(1, 40))]
        pieces, s = stream(any_tokenizer, ids)
        assert "".join(pieces) == s.text == any_tokenizer.decode(ids), ids
        assert not any(p.endswith("\ufffd") for p in pieces[:-1]), ids


def test_sentencepiece_spaces(reference_tokenizer):
    """SentencePiece drops the leading spaces of what it decodes first; mid-answer they stay."""
    ids = [557, 557, 593, 557, 557, 263, 557, 13, 263, 35, 263]  # ▁ ▁ x ▁ ▁ ▁a ▁ <0x0A> ▁a <0x20> ▁a
    pieces, _ = stream(reference_tokenizer, ids)
    assert "".join(pieces) == reference_tokenizer.decode(ids) == "x   a \n a  a"
    for text in ("What color is the star?", "  two  spaces", "line\n  indented", "中文 🙂 ok"):
        ids = reference_tokenizer.encode(text)
        assert "".join(stream(reference_tokenizer, ids)[0]) == reference_tokenizer.decode(ids)


def test_any_decode_object():
    """A tokenizer that only has decode(ids), joining words with spaces (WordLevel-like)."""
    words = ["the", "cat", "sat", ".", "on", "mat"]

    class Words:
        def decode(self, ids):
            return " ".join(words[i] for i in ids)

    ids = [0, 1, 2, 4, 0, 5, 3]
    pieces, _ = stream(Words(), ids)
    assert "".join(pieces) == Words().decode(ids)


def test_each_token_is_decoded_a_bounded_number_of_times(any_tokenizer):
    ids = any_tokenizer.encode(MIXED * 40)
    counting = Counting(any_tokenizer)
    pieces, _ = stream(counting, ids)
    assert "".join(pieces) == any_tokenizer.decode(ids)
    assert counting.calls <= 2 * len(ids) + 1
    assert max(counting.sizes) <= 6  # a window: context + an unfinished character's bytes
    assert sum(counting.sizes) <= 6 * len(ids)


def test_stop_string(any_tokenizer):
    text = "one 中文 two STOP three 🙂"
    for stop, before in (("STOP", "one 中文 two "), ("文 t", "one 中"), ("🙂", "one 中文 two STOP three ")):
        shown = ""
        s = TextStream(any_tokenizer, [stop])
        for i in any_tokenizer.encode(text):
            shown += s.push(i)
            assert stop[:2] not in shown and "\ufffd" not in shown
            if s.stopped:
                break
        assert s.stopped and shown == s.text == before and s.finish() == ""


def test_no_stop_string_keeps_the_held_tail(llama3):
    pieces, s = stream(llama3, llama3.encode("say STO"), stop=["STOP"])
    assert pieces[-1] == "STO" and s.text == "say STO" and not s.stopped


class SecondEos:
    """The reference tokenizer with a second eos id (as CogVLM2 has <|eot_id|> after <|end_of_text|>)."""

    def __init__(self, tokenizer, extra: int) -> None:
        self.tokenizer, self.eos_token_ids = tokenizer, (tokenizer.eos_token_id, extra)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_pipeline_stops_at_either_eos_and_never_shows_it(reference_model, reference_tokenizer):
    vlm = Pipeline(reference_model, reference_tokenizer, GenerationConfig(max_new_tokens=8))
    ids = vlm.build("What is a cat?")["input_ids"][None]
    tokens = reference_model.generate(input_ids=ids, max_new_tokens=8, eos_token_id=[])[0, ids.shape[1] :].tolist()
    assert reference_tokenizer.eos_token_id not in tokens
    cut = 3  # the answer's fourth token ends it when it is an eos id, and is not shown
    stopped = Pipeline(reference_model, SecondEos(reference_tokenizer, tokens[cut]), GenerationConfig(max_new_tokens=8))
    assert stopped.chat("What is a cat?") == reference_tokenizer.decode(tokens[: tokens.index(tokens[cut])])
    assert vlm.chat("What is a cat?") == reference_tokenizer.decode(tokens)
