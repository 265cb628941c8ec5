"""Beam search: the beams of transformers' beam search on the exported LLaMA (text-only), images
carried through the cache, batch equivalence, settings; captioning asks for beams by task."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from cogvlm import SettingsError
from cogvlm.eval.runner import predict
from cogvlm.eval.tasks import Item, get_task
from cogvlm.export import export_llm
from cogvlm.generation import BeamSettings, GenerationConfig, beam_search
from cogvlm.pipeline import Pipeline
from cogvlm.prompts import collate

PAD = 7  # any id but 0: transformers' beam search fills ended rows with the eos id when the pad id is 0


@pytest.fixture(scope="module")
def llama(tmp_path_factory, reference_dir):
    transformers = pytest.importorskip("transformers")
    out = export_llm(reference_dir, tmp_path_factory.mktemp("export") / "llama")
    return transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(reference_tokenizer):
    """Two text prompts of different lengths, left-padded: input_ids, attention_mask (2, T)."""
    rows = [
        [reference_tokenizer.bos_token_id, *reference_tokenizer.encode("Question: What is a cat? Answer:")],
        [reference_tokenizer.bos_token_id, *reference_tokenizer.encode("Describe the dog.")],
    ]
    t = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (t - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (t - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.fixture(scope="module")
def vlm(reference_model, reference_tokenizer):
    return Pipeline(reference_model, reference_tokenizer, GenerationConfig(max_new_tokens=12))


@pytest.fixture(scope="module")
def image_batch(vlm, reference_dir):
    """An image prompt, a text prompt and another image prompt, built (`collate` left-pads them)."""
    images = [Image.open(reference_dir / "images" / f"img{i}.png").convert("RGB") for i in (0, 1)]
    return [
        vlm.build("Describe this image.", images[0]),
        vlm.build("What is a cat?"),
        vlm.build("What color is the star?", images[1], template_version="vqa"),
    ]


# The tokens the tiny model's beams use most (beam search without an eos id, 16 tokens): as eos
# ids they end hypotheses at many lengths, so rows fill their hypotheses early or late.
FEW_EOS = [499, 285, 270, 350]
MANY_EOS = [499, 285, 270, 350, 211, 67, 441, 86, 112, 271]
CASES = {  # name: (num_beams, eos ids, length_penalty, early_stopping)
    "plain": (4, FEW_EOS, 1.0, False),
    "early": (4, FEW_EOS, 1.0, True),
    "short": (4, FEW_EOS, -1.0, False),
    "long-early": (4, FEW_EOS, 2.0, True),
    "unnormalised-never": (4, FEW_EOS, 0.0, "never"),
    "two-beams": (2, MANY_EOS, 1.0, False),
    "two-beams-never": (2, MANY_EOS, 1.0, "never"),
    "three-beams-never": (3, MANY_EOS, 0.5, "never"),
}


def test_beams_equal_transformers_beam_search_on_the_exported_llama(llama, reference_model, prompts):
    """Text-only CogVLM is its exported LLaMA: transformers' beam search and ours give the same
    hypotheses, all num_beams of each of two left-padded prompts, in the same order (sequences
    exactly) with the same scores (1e-4), for each setting. The settings are chosen so that each
    knob changes the result: early stopping, the length penalty's sign, "never"."""
    ids, mask = prompts
    t = ids.shape[1]
    found = {}
    for name, (beams, eos, length_penalty, early_stopping) in CASES.items():
        settings = dict(
            num_beams=beams,
            num_return_sequences=beams,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            max_new_tokens=16,
        )
        with torch.no_grad():
            theirs = llama.generate(
                ids,
                attention_mask=mask,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=PAD,
                return_dict_in_generate=True,
                output_scores=True,
                **settings,
            )
        ours = reference_model.generate(
            input_ids=ids, attention_mask=mask, eos_token_id=eos, pad_token_id=PAD, **settings
        )
        assert ours.shape == theirs.sequences.shape and torch.equal(ours, theirs.sequences), name
        batch = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask, "images": None}
        hypotheses = beam_search(
            reference_model, batch, BeamSettings(beams, 16, length_penalty, early_stopping, beams), eos
        )
        scores = torch.tensor([h.score for row in hypotheses for h in row])
        torch.testing.assert_close(scores, theirs.sequences_scores, atol=1e-4, rtol=0, msg=name)
        found[name] = ours[:, t:].tolist()
    assert any(PAD in row for row in found["short"])  # some hypotheses ended on an eos id
    assert found["early"] != found["plain"]
    assert found["short"] != found["plain"]
    assert found["two-beams-never"] != found["two-beams"]


def _recomputed_score(model, sample, tokens, length_penalty):
    """Sum of the log-probabilities of `tokens` after the prompt, by one full forward (no cache),
    divided by len(tokens) ** length_penalty: what a hypothesis' score must be."""
    ids = torch.cat((sample["input_ids"], torch.tensor(tokens)))[None]
    types = torch.cat((sample["token_type_ids"], torch.zeros(len(tokens), dtype=torch.long)))[None]
    with torch.no_grad():
        logits = model(input_ids=ids, token_type_ids=types, images=[sample["images"] or []]).logits[0]
    t = len(sample["input_ids"])
    logprobs = logits[t - 1 : -1].float().log_softmax(-1)
    return float(logprobs.gather(1, torch.tensor(tokens)[:, None]).sum()) / len(tokens) ** length_penalty


def test_beams_carry_the_image_through_the_cache(reference_model, image_batch):
    """With images in the prompt (the cache rows repeated per beam and gathered each step), every
    hypothesis' score equals its log-probability under one full forward of prompt + hypothesis
    (1e-4), and a batch of image and text prompts finds what each prompt finds alone."""
    batch = collate(image_batch, pad_token_id=0)
    eos = [499, 446, 211]  # the tokens these beams use most: the third prompt's beams all end by step 6
    settings = BeamSettings(num_beams=3, max_new_tokens=10, early_stopping=True, num_return_sequences=3)
    together = beam_search(reference_model, batch, settings, eos)
    for sample, hypotheses in zip(image_batch, together):
        for h in hypotheses:
            assert h.score == pytest.approx(_recomputed_score(reference_model, sample, h.tokens, 1.0), abs=1e-4)
        assert [h.score for h in hypotheses] == sorted((h.score for h in hypotheses), reverse=True)
    assert max(len(h.tokens) for h in together[2]) < 10  # that row left the batch before the others
    for sample, hypotheses in zip(image_batch, together):
        alone = beam_search(reference_model, collate([sample]), settings, eos)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in hypotheses]
        assert [h.score for h in alone] == pytest.approx([h.score for h in hypotheses], abs=1e-5)


def test_one_beam_stopping_early_is_greedy(vlm, reference_model, image_batch):
    """One beam that stops at its first hypothesis is greedy decoding, image prompts included."""
    batch = collate(image_batch, pad_token_id=0)
    t = batch["input_ids"].shape[1]
    greedy = vlm.model.generate(**batch, max_new_tokens=6, pad_token_id=PAD)
    eos = int(greedy[1, t + 2])
    greedy = vlm.model.generate(**batch, max_new_tokens=6, pad_token_id=PAD, eos_token_id=eos)
    found = beam_search(reference_model, batch, BeamSettings(1, 6, early_stopping=True), eos)
    for row, hypotheses in zip(greedy[:, t:].tolist(), found):
        assert hypotheses[0].tokens == [tok for tok in row if tok != PAD]


def test_beam_settings_are_checked(reference_model, prompts):
    ids, mask = prompts
    for bad in ({"early_stopping": "sometimes"}, {"num_return_sequences": 5}, {"do_sample": True}):
        with pytest.raises(SettingsError):
            reference_model.generate(input_ids=ids, attention_mask=mask, num_beams=4, max_new_tokens=2, **bad)
    with pytest.raises(SettingsError):
        reference_model.generate(input_ids=ids, attention_mask=mask, num_return_sequences=2, max_new_tokens=2)
    out = reference_model.generate(input_ids=ids, attention_mask=mask, num_beams=3, num_return_sequences=2)
    assert out.shape[0] == 4 and torch.equal(out[::2, : ids.shape[1]], ids)  # each prompt's best first


class _Recorder:
    """A pipeline that answers "a cat." and records the generation settings it was asked with."""

    def __init__(self) -> None:
        self.settings: list[dict] = []

    def batch(self, requests, **gen):
        self.settings.append(gen)
        return ["a cat."] * len(requests)


def test_captioning_asks_for_the_tasks_beams(tmp_path):
    """Captioning decodes greedily by default, as the official CogVLM evaluation does (its beam
    search strategy is commented out); a task with num_beams > 1 asks the pipeline for beams."""
    task = get_task("coco-caption")
    assert task.num_beams == 1
    items = [Item(id=str(i), image=tmp_path / "x.png", query="q", target=["a cat."]) for i in range(3)]
    greedy = _Recorder()
    predict(greedy, task, items, batch_size=2)
    assert all("num_beams" not in gen for gen in greedy.settings)
    beams = _Recorder()
    predict(beams, dataclasses.replace(task, num_beams=5), items, batch_size=2)
    assert [gen["num_beams"] for gen in beams.settings] == [5, 5]


def test_pipeline_batch_answers_with_the_best_beam(reference_model, reference_tokenizer, reference_dir):
    """`Pipeline.batch(..., num_beams=N)` (what the captioning tasks call) answers with the drop-in
    generate's best beam, decoded."""
    from PIL import Image

    from cogvlm.pipeline import Pipeline
    from cogvlm.prompts import collate

    vlm = Pipeline(reference_model, reference_tokenizer)
    image = Image.open(reference_dir / "images" / "img0.png").convert("RGB")
    requests = [{"query": "Describe this image.", "image": image}, {"query": "What is a cat?"}]
    answers = vlm.batch(requests, num_beams=3, max_new_tokens=8)
    for request, answer in zip(requests, answers):
        batch = collate([vlm.build(request["query"], request.get("image"))])
        out = reference_model.generate(**batch, num_beams=3, max_new_tokens=8, pad_token_id=0)
        new = [t for t in out[0, batch["input_ids"].shape[1] :].tolist() if t not in (0, 2)]
        assert answer == reference_tokenizer.decode(new)
