"""The image feature cache: a picture asked about again is not encoded again, whoever asks (the
Pipeline's chat turns and batches, the server's engine), and the answers stay those of encoding
it every time."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
import torch
from PIL import Image

from cogvlm.generation import GenerationConfig, ImageFeatureCache
from cogvlm.pipeline import Pipeline
from cogvlm.prompts import build_conversation_input_ids
from cogvlm.serve import EngineSettings
from cogvlm.serve.engine import Engine


@pytest.fixture
def tower_batches(reference_model, monkeypatch) -> list[int]:
    """The batch size of every call of the vision tower."""
    vision = reference_model.model.vision
    calls: list[int] = []
    inner = vision.forward

    def counted(images, *args, **kwargs):
        calls.append(images.shape[0])
        return inner(images, *args, **kwargs)

    monkeypatch.setattr(vision, "forward", counted)
    return calls


@pytest.fixture(scope="module")
def pictures() -> list[Image.Image]:
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8)) for i in range(3)]


def pixels(model, tokenizer, picture: Image.Image) -> torch.Tensor:
    """A picture preprocessed as the prompt builder does it, (3, S, S)."""
    return build_conversation_input_ids(tokenizer, model.config, query="q", images=[picture])["images"][0]


def png(picture: Image.Image) -> bytes:
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


def test_a_picture_asked_about_again_is_not_encoded_again(
    reference_model, reference_tokenizer, pictures, tower_batches
):
    cached = Pipeline(reference_model, reference_tokenizer)
    first = cached.chat("What is in the image?", pictures[0], max_new_tokens=12)
    # The same picture again, sent as PNG bytes this time, in a later turn and in a batch.
    second = cached.chat("And the colours?", png(pictures[0]), [("What is in the image?", first)], max_new_tokens=12)
    batch = cached.batch([{"query": "Describe it.", "image": pictures[0]}] * 2, max_new_tokens=12)
    assert tower_batches == [1], "the tower ran for more than the first question"

    tower_batches.clear()
    every_time = Pipeline(reference_model, reference_tokenizer, image_cache=ImageFeatureCache(max_bytes=0))
    assert every_time.chat("What is in the image?", pictures[0], max_new_tokens=12) == first
    assert (
        every_time.chat("And the colours?", pictures[0], [("What is in the image?", first)], max_new_tokens=12)
        == second
    )
    assert every_time.batch([{"query": "Describe it.", "image": pictures[0]}] * 2, max_new_tokens=12) == batch
    assert tower_batches == [1, 1, 1], "with nothing kept, every call encodes (a repeat within a batch once)"


def test_a_batch_encodes_each_picture_once_and_gives_features_in_order(
    reference_model, reference_tokenizer, pictures, tower_batches
):
    a, b = (pixels(reference_model, reference_tokenizer, p) for p in pictures[:2])
    cache = ImageFeatureCache()
    features = cache(reference_model, [[a], [b], [], [a.clone()]])  # a text-only row holds none
    assert tower_batches == [2]
    with torch.no_grad():
        expected = reference_model.model.encode_images(torch.stack([a, b, a]))
    torch.testing.assert_close(features, expected)
    assert cache(reference_model, [[], []]) is None


def test_least_recently_used_pictures_leave_first(reference_model, reference_tokenizer, pictures, tower_batches):
    a, b, c = (pixels(reference_model, reference_tokenizer, p) for p in pictures)
    entry = ImageFeatureCache()(reference_model, [[a]])[0]
    cache = ImageFeatureCache(max_bytes=2 * entry.numel() * entry.element_size())  # room for two
    tower_batches.clear()
    for picture in (a, b, a, c):  # a is used again before c comes, so b leaves
        cache(reference_model, [[picture]])
    assert tower_batches == [1, 1, 1] and len(cache) == 2 and cache.nbytes == cache.max_bytes
    cache(reference_model, [[a]])
    assert tower_batches == [1, 1, 1], "a was kept"
    cache(reference_model, [[b]])
    assert tower_batches == [1, 1, 1, 1], "b had left"
    cache(reference_model, [[a]])
    assert tower_batches == [1, 1, 1, 1], "c left for b, not a"


def test_one_changed_pixel_is_another_picture(reference_model, reference_tokenizer, pictures, tower_batches):
    changed = np.array(pictures[0])
    changed[0, 0] = 255 - changed[0, 0]
    a, a2 = (pixels(reference_model, reference_tokenizer, p) for p in (pictures[0], Image.fromarray(changed)))
    assert not torch.equal(a, a2)
    cache = ImageFeatureCache()
    first, second = cache(reference_model, [[a]]), cache(reference_model, [[a2]])
    assert tower_batches == [1, 1] and len(cache) == 2
    assert not torch.equal(first, second)


def test_nothing_is_kept_past_max_bytes(reference_model, reference_tokenizer, pictures):
    cache = ImageFeatureCache(max_bytes=0)
    cache(reference_model, [[pixels(reference_model, reference_tokenizer, pictures[0])]])
    assert len(cache) == 0 and cache.nbytes == 0
    with pytest.raises(ValueError, match="max_bytes"):
        ImageFeatureCache(max_bytes=-1)


def test_the_server_engine_encodes_a_picture_sent_again_once(
    reference_model, reference_tokenizer, pictures, tower_batches
):
    vlm = Pipeline(reference_model, reference_tokenizer)
    engine = Engine(vlm, EngineSettings(max_batch=2)).start()
    turns = [vlm.build("What is in the image?", pictures[1]), vlm.build("Is it red?", png(pictures[1]))]

    async def ask(sample) -> str:
        job = engine.submit(sample, GenerationConfig(max_new_tokens=8), "r")
        text = ""
        while (event := await job.events.get()).kind == "text":
            text += event.text
        assert event.kind == "done", event
        return text

    async def both() -> list[str]:
        return [await ask(turn) for turn in turns]

    try:
        answers = asyncio.run(asyncio.wait_for(both(), 60))
    finally:
        engine.close()
    assert tower_batches == [1]
    alone = Pipeline(reference_model, reference_tokenizer, image_cache=ImageFeatureCache(max_bytes=0))
    assert answers == [alone.chat(q, pictures[1], max_new_tokens=8) for q in ("What is in the image?", "Is it red?")]


def test_the_next_chat_turn_about_an_image_prefills_only_its_text(reference_model, reference_tokenizer, pictures):
    """A pipeline keeps its one-request calls' KV cache with the last image's [BOS, image] prefix:
    the next turn about that picture prefills only its text, and answers as a pipeline that keeps
    nothing. A call left unfinished (a stream abandoned after its first piece) or `clear()` leaves
    nothing kept, and the next turn computes the prefix again, still with the same answer."""
    kept = Pipeline(reference_model, reference_tokenizer)
    fresh = Pipeline(reference_model, reference_tokenizer)
    fresh.keep_prefix = False
    prefix = 1 + reference_model.config.image_tokens
    prefills: list[int] = []

    def record(_, args):
        if args[0].shape[1] > 1:
            prefills.append(args[0].shape[1])

    turns = [("What is in the image?", pictures[0], [])]
    turns.append(("And the colours?", pictures[0], [("What is in the image?", "a cat.")]))
    turns.append(("Is it dark?", pictures[1], []))  # another picture: its prefix replaces the first
    turns.append(("Is it light?", pictures[1], []))
    hook = reference_model.model.layers[0].register_forward_pre_hook(record)
    try:
        seen = []
        for query, picture, history in turns:
            prefills.clear()
            answer = kept.chat(query, picture, history, max_new_tokens=8)
            seen.append(list(prefills))
            assert answer == fresh.chat(query, picture, history, max_new_tokens=8), query
        prefills.clear()
        next(kept.stream("Is it red?", pictures[1], max_new_tokens=8))  # abandoned: its state is dropped
        for clear in (False, True):
            if clear:
                kept.clear()
            prefills.clear()
            answer = kept.chat("Is it blue?", pictures[1], max_new_tokens=8)
            seen.append(list(prefills))
            assert answer == fresh.chat("Is it blue?", pictures[1], max_new_tokens=8)
    finally:
        hook.remove()
    texts = [len(kept.build(q, p, h)["input_ids"]) - prefix for q, p, h in turns]
    blue = len(kept.build("Is it blue?", pictures[1])["input_ids"]) - prefix
    # "Is it blue?" after the abandoned stream, then after clear(): its prefix computed both times
    assert seen == [[prefix, texts[0]], [texts[1]], [prefix, texts[2]], [texts[3]], [prefix, blue], [prefix, blue]]
