"""Sampling in a batch: the per-row seed rule, and outputs on the input's device and dtype."""

from __future__ import annotations

import pytest
import torch

from cogvlm.generation import GenerationConfig, row_seeds


@pytest.fixture(scope="module")
def prompt(reference_tokenizer):
    return torch.tensor([[reference_tokenizer.bos_token_id, *reference_tokenizer.encode("Question: What is a cat?")]])


def _rows(out: torch.Tensor, t: int, pad: int) -> list[list[int]]:
    """The new tokens of each row, without the right padding."""
    rows = out[:, t:].tolist()
    return [row[: max((i + 1 for i, tok in enumerate(row) if tok != pad), default=0)] for row in rows]


def test_row_i_of_a_seeded_batch_draws_as_seed_plus_i_alone(reference_model, prompt):
    """Four copies of one prompt with seed s: four different samples, row i exactly the sample
    of the prompt alone with seed s + i."""
    settings = dict(do_sample=True, temperature=1.5, top_k=50, max_new_tokens=8, pad_token_id=0)
    t = prompt.shape[1]
    together = _rows(reference_model.generate(input_ids=prompt.repeat(4, 1), seed=11, **settings), t, 0)
    alone = [_rows(reference_model.generate(input_ids=prompt, seed=11 + i, **settings), t, 0)[0] for i in range(4)]
    assert together == alone
    assert len({tuple(row) for row in together}) == 4
    again = _rows(reference_model.generate(input_ids=prompt.repeat(4, 1), seed=11, **settings), t, 0)
    assert again == together


def test_row_seeds_rule():
    sampled = GenerationConfig(do_sample=True, seed=5)
    assert [c.seed for c in row_seeds([sampled] * 3)] == [5, 6, 7]
    assert [c.seed for c in row_seeds([sampled.replace(seed=2**64 - 1)] * 2)] == [2**64 - 1, 0]  # torch's range
    unseeded, greedy = GenerationConfig(do_sample=True), GenerationConfig(seed=5)
    assert row_seeds([unseeded, unseeded]) == [unseeded, unseeded]
    assert row_seeds([greedy, greedy]) == [greedy, greedy]


@pytest.mark.parametrize("settings", [{}, {"do_sample": True, "seed": 1}, {"num_beams": 3}])
def test_output_has_the_inputs_dtype_and_device(reference_model, prompt, settings):
    ids = prompt.to(torch.int32)
    out = reference_model.generate(input_ids=ids, max_new_tokens=4, **settings)
    assert (out.dtype, out.device) == (ids.dtype, ids.device)
    assert torch.equal(out[:, : ids.shape[1]], ids)


@pytest.mark.gpu
@pytest.mark.parametrize("settings", [{}, {"do_sample": True, "seed": 1}, {"num_beams": 3}])
def test_output_stays_on_the_gpu(reference_dir, prompt, settings):
    """A model and input_ids on the GPU: greedy, sampled and beam outputs stay there."""
    from cogvlm import CogVLMForCausalLM

    model = CogVLMForCausalLM.from_pretrained(reference_dir).to("cuda")
    ids = prompt.to("cuda")
    out = model.generate(input_ids=ids, max_new_tokens=4, **settings)
    assert out.device == ids.device and out.dtype == ids.dtype
    assert torch.equal(out[:, : ids.shape[1]], ids)
