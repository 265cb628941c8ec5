"""Export the language expert as a standard LLaMA checkpoint (transformers' LlamaForCausalLM).

Without an image CogVLM *is* this model: same embeddings, language-expert QKV/dense/MLP, norms
and head, RoPE (the config's base) over the whole head in the same rotate-half layout, so no permutation.
CogVLM2's language expert is Llama-3-8B: grouped-query attention (the fused QKV splits as
`[H, Hkv, Hkv] x K`, and LLaMA's query head j reads KV head j // (H / Hkv), the same grouping),
RoPE base 500000, Llama-3's vocabulary, bos and both eos ids.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import CogVLMConfig
from .fileio import write_json
from .loading import generation_defaults, load_model, resolve_folder
from .loading.files import save_state_dict
from .tokenizer import copy_tokenizer_files


def _token_ids(config: CogVLMConfig) -> dict:
    """bos, eos (a list when there are several: CogVLM2's <|end_of_text|> and <|eot_id|>) and pad."""
    eos = list(config.eos_token_ids) if len(config.eos_token_ids) > 1 else config.eos_token_id
    return {"bos_token_id": config.bos_token_id, "eos_token_id": eos, "pad_token_id": config.pad_token_id}


def llama_config(config: CogVLMConfig, dtype: torch.dtype) -> dict:
    """transformers' LlamaConfig fields for the language expert."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": config.hidden_act,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": config.initializer_range,
        **_token_ids(config),
        "torch_dtype": str(dtype).replace("torch.", ""),
    }


def language_state_dict(state: dict[str, torch.Tensor], config: CogVLMConfig) -> dict[str, torch.Tensor]:
    """CogVLM weight names -> LLaMA names, keeping only the language expert."""
    q_rows, kv_rows = config.num_attention_heads * config.head_dim, config.num_kv_heads * config.head_dim
    out = {
        "model.embed_tokens.weight": state["model.embed_tokens.weight"],
        "model.norm.weight": state["model.norm.weight"],
        "lm_head.weight": state["lm_head.weight"],
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        qkv = state[src + "self_attn.language_expert_query_key_value.weight"]  # ((H + 2 Hkv) K, D)
        q, k, v = qkv.split((q_rows, kv_rows, kv_rows), dim=0)
        out |= {
            dst + "self_attn.q_proj.weight": q,
            dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": state[src + "self_attn.language_expert_dense.weight"],
            dst + "input_layernorm.weight": state[src + "input_layernorm.weight"],
            dst + "post_attention_layernorm.weight": state[src + "post_attention_layernorm.weight"],
        }
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out[dst + f"mlp.{proj}.weight"] = state[src + f"mlp.language_mlp.{proj}.weight"]
    return {name: t.contiguous() for name, t in out.items()}


def export_llm(
    model: str | Path, out: str | Path, max_shard_size: int | str = "5GB", revision: str | None = None
) -> Path:
    """Write `out` as a LLaMA folder (config.json, generation_config.json, safetensors, tokenizer
    files if present) from a model folder or hub id. The folder's sampling defaults go along
    (CogVLM2: temperature 0.6, top-p 0.9), so the exported model generates as the source does."""
    folder, out = resolve_folder(model, revision), Path(out)
    model = load_model(folder, dtype="auto")
    out.mkdir(parents=True, exist_ok=True)
    save_state_dict(language_state_dict(model.state_dict(), model.config), out, max_shard_size)
    write_json(out / "config.json", llama_config(model.config, model.dtype))
    write_json(out / "generation_config.json", {**_token_ids(model.config), **generation_defaults(folder)})
    copy_tokenizer_files(folder, out)
    return out
