"""Text-only CogVLM is exactly its language model: the exported LLaMA gives the same logits."""

from __future__ import annotations

import pytest
import torch

from cogvlm.export import export_llm

transformers = pytest.importorskip("transformers")


def test_exported_llama_matches_text_only(tmp_path, reference_dir, reference_model, reference_tokenizer):
    out = export_llm(reference_dir, tmp_path / "llama")
    assert (out / "tokenizer.model").is_file()
    llama = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ids = torch.tensor(
        [
            [
                reference_tokenizer.bos_token_id,
                *reference_tokenizer.encode("Question: What is a cat? Answer: a small animal"),
            ]
        ]
    )
    with torch.no_grad():
        ours = reference_model(input_ids=ids).logits
        theirs = llama(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=0)
    with torch.no_grad():
        greedy = llama.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(reference_model.generate(input_ids=ids, max_new_tokens=8), greedy)
