"""Text-only CogVLM is exactly its language model: the exported LLaMA gives the same logits."""

from __future__ import annotations

import json

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


def test_exported_cogvlm2_is_llama3_with_grouped_query_attention(tmp_path, cogvlm2_dir, cogvlm2_model, cogvlm2_tensors):
    """CogVLM2's language expert as a Llama-3 folder: 2 KV heads for 4 query heads in the fixture
    (8 for 32 in the 19B), RoPE base 500000, Llama-3's ids; transformers' LlamaForCausalLM gives
    CogVLM2's logits on text-only input (1e-4, fp32) and the official greedy tokens."""
    out = export_llm(cogvlm2_dir, tmp_path / "llama3")
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["rope_theta"]) == (4, 2, 500000.0)
    assert (config["bos_token_id"], config["eos_token_id"], config["vocab_size"]) == (128000, [128001, 128009], 128256)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [128001, 128009]
    assert (out / "tokenizer.json").is_file()
    llama = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert llama.config.num_key_value_heads == 2
    for case in ("chat_text_hist", "batch_text"):  # text only; batch_text is left-padded
        ids, mask = cogvlm2_tensors[f"{case}.input_ids"], cogvlm2_tensors[f"{case}.attention_mask"]
        positions = cogvlm2_tensors[f"{case}.position_ids"]
        with torch.no_grad():
            ours = cogvlm2_model(input_ids=ids, attention_mask=mask).logits
            theirs = llama(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        real = mask.bool()
        torch.testing.assert_close(ours[real], theirs.float()[real], atol=1e-4, rtol=0)
    ids = cogvlm2_tensors["chat_text_hist.input_ids"]
    with torch.no_grad():
        greedy = llama.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=128002)
    assert torch.equal(greedy, cogvlm2_tensors["chat_text_hist.sequences"])  # the official CogVLM2 tokens


def test_export_keeps_the_folders_sampling_defaults(tmp_path, cogvlm2_dir):
    """The released CogVLM2 generation_config.json samples (temperature 0.6, top-p 0.9): the
    exported Llama-3 generates with the same defaults."""
    folder = tmp_path / "cogvlm2"
    folder.mkdir()
    for path in cogvlm2_dir.iterdir():
        (folder / path.name).symlink_to(path)
    (folder / "generation_config.json").unlink()
    released = {
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
        "max_length": 4096,
        "eos_token_id": [128001, 128009],
    }
    (folder / "generation_config.json").write_text(json.dumps(released))
    out = export_llm(folder, tmp_path / "llama3")
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert (generation.do_sample, generation.temperature, generation.top_p, generation.top_k) == (True, 0.6, 0.9, 50)
    assert generation.max_length == 4096 and generation.eos_token_id == [128001, 128009]
