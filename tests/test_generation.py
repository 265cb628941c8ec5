"""The generation engine and the Pipeline: batching, sampling, stop strings, streaming."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from cogvlm import SettingsError
from cogvlm.generation import BatchDecoder, GenerationConfig, sample
from cogvlm.pipeline import Pipeline
from cogvlm.prompts import collate
from cogvlm.streaming import TextStream


@pytest.fixture(scope="module")
def vlm(reference_model, reference_tokenizer):
    return Pipeline(reference_model, reference_tokenizer, GenerationConfig(max_new_tokens=12))


@pytest.fixture(scope="module")
def images(reference_dir):
    return [Image.open(reference_dir / "images" / f"img{i}.png").convert("RGB") for i in (0, 1)]


def test_batch_equals_alone(vlm, images):
    requests = [
        {"query": "Describe this image.", "image": images[0]},
        {"query": "What color is the star?", "image": images[1], "template_version": "vqa"},
        {
            "query": "Where is the dog?",
            "image": images[0],
            "history": [("What is in the image?", "a red cat."), ("Is there a blue box?", "yes")],
        },
        {"query": "What is a cat?"},  # text only, in the same batch as image requests
        {"query": "A picture of", "image": images[1], "template_version": "base"},
    ]
    batched = vlm.batch(requests)
    alone = [vlm.batch([r])[0] for r in requests]
    assert batched == alone
    assert len(set(batched)) > 1


def test_finished_rows_leave_the_batch(reference_model, reference_tokenizer):
    rows = [reference_tokenizer.encode("Question: hi Answer:", add_special_tokens=True)] * 3
    data = collate(
        [
            {
                "input_ids": torch.tensor(r),
                "token_type_ids": torch.zeros(len(r), dtype=torch.long),
                "attention_mask": torch.ones(len(r), dtype=torch.long),
                "images": None,
            }
            for r in rows
        ]
    )
    configs = [GenerationConfig(max_new_tokens=n) for n in (2, 5, 9)]
    decoder = BatchDecoder(reference_model, data, configs, eos_token_id=None)
    sizes = [len(step) for step in decoder]
    assert sizes == [3, 3, 2, 2, 2, 1, 1, 1, 1]
    assert [len(t) for t in decoder.tokens] == [2, 5, 9]


def test_stream_equals_the_non_streaming_path(vlm, images):
    """Streamed pieces join to what the drop-in `generate` (a separate decode loop) gives, decoded once."""
    for kwargs in ({"image": images[0]}, {}, {"image": images[1], "template_version": "vqa"}):
        pieces = list(vlm.stream("Describe this image.", **kwargs))
        batch = collate([vlm.build("Describe this image.", **kwargs)])
        prompt = batch["input_ids"].shape[1]
        out = vlm.model.generate(**batch, max_new_tokens=12, eos_token_id=vlm.tokenizer.eos_token_id)
        new = out[0, prompt:].tolist()
        new = new[: new.index(vlm.tokenizer.eos_token_id)] if vlm.tokenizer.eos_token_id in new else new
        assert "".join(pieces) == vlm.tokenizer.decode(new)
        assert len(pieces) > 1


def test_sampling_reproducible_with_seed(vlm, images):
    kwargs = dict(image=images[0], do_sample=True, temperature=1.5, top_p=0.9, top_k=50)
    first = vlm.chat("Describe this image.", seed=7, **kwargs)
    assert vlm.chat("Describe this image.", seed=7, **kwargs) == first
    others = {vlm.chat("Describe this image.", seed=s, **kwargs) for s in range(8, 13)}
    assert others - {first}
    assert first != vlm.chat("Describe this image.", image=images[0])  # not the greedy answer


def test_seeded_sampling_is_isolated_in_a_batch(vlm, images):
    request = {"query": "Describe this image.", "image": images[0]}
    alone = vlm.batch([request], do_sample=True, temperature=1.3, seed=3)
    together = vlm.batch([request, {"query": "What is a cat?"}], do_sample=True, temperature=1.3, seed=3)
    assert together[0] == alone[0]


def test_stop_strings(vlm, images):
    full = vlm.chat("Describe this image.", image=images[1])
    stop = full[3:6]
    cut = vlm.chat("Describe this image.", image=images[1], stop=[stop])
    assert cut == full[: full.index(stop)]
    pieces = list(vlm.stream("Describe this image.", image=images[1], stop=stop))
    assert "".join(pieces) == cut


def test_max_new_tokens_and_eos(reference_model, reference_tokenizer):
    ids = torch.tensor([reference_tokenizer.encode("Question: hi Answer:", add_special_tokens=True)])
    out = reference_model.generate(input_ids=ids, max_new_tokens=5)
    assert out.shape == (1, ids.shape[1] + 5)
    first = int(out[0, ids.shape[1]])
    stopped = reference_model.generate(input_ids=ids, max_new_tokens=5, eos_token_id=first)
    assert stopped.shape == (1, ids.shape[1] + 1)
    assert reference_model.generate(input_ids=ids, max_length=ids.shape[1] + 3).shape[1] == ids.shape[1] + 3


def test_sample_greedy_and_filters():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    assert sample(logits, GenerationConfig(), torch.tensor([], dtype=torch.long)) == 1
    g = torch.Generator().manual_seed(0)
    picks = {
        sample(logits, GenerationConfig(do_sample=True, top_k=2), torch.tensor([], dtype=torch.long), g)
        for _ in range(50)
    }
    assert picks == {1, 2}
    picks = {
        sample(logits, GenerationConfig(do_sample=True, top_p=0.5), torch.tensor([], dtype=torch.long), g)
        for _ in range(50)
    }
    assert picks == {1}
    # Repetition penalty divides positive logits of seen tokens: 3.0 / 4 < 2.0, so token 2 wins.
    penalised = GenerationConfig(repetition_penalty=4.0)
    assert sample(logits, penalised, torch.tensor([1])) == 2


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=0),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(max_new_tokens=0),
        dict(repetition_penalty=0),
    ],
)
def test_bad_settings(bad):
    with pytest.raises(SettingsError):
        GenerationConfig(**bad)


def test_stream_never_emits_half_characters(reference_tokenizer):
    text = "émoji 🙂 and 中文 ok"
    ids = reference_tokenizer.encode(text)
    stream = TextStream(reference_tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == text == stream.text
    assert not any("\ufffd" in p for p in pieces)


def test_stream_holds_back_a_possible_stop_string(reference_tokenizer):
    ids = reference_tokenizer.encode("one two STOP three")
    stream = TextStream(reference_tokenizer, stop=["STOP"])
    shown = ""
    for i in ids:
        shown += stream.push(i)
        assert "ST" not in shown
        if stream.stopped:
            break
    assert stream.stopped and shown == stream.text == "one two "


def test_prompt_too_long(vlm):
    from cogvlm import PromptError

    with pytest.raises(PromptError, match="prompt too long"):
        vlm.chat("word " * 3000)
