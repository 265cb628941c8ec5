"""Export the language expert as a standard LLaMA checkpoint (transformers' LlamaForCausalLM).

Without an image CogVLM *is* this model: same embeddings, language-expert QKV/dense/MLP, norms
and head, RoPE (the config's base) over the whole head in the same rotate-half layout, so no permutation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import CogVLMConfig
from .fileio import write_json
from .loading import load_model, resolve_folder
from .loading.files import save_state_dict
from .tokenizer import copy_tokenizer_files


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
        "num_key_value_heads": config.num_attention_heads,
        "hidden_act": config.hidden_act,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": config.initializer_range,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": str(dtype).replace("torch.", ""),
    }


def language_state_dict(state: dict[str, torch.Tensor], config: CogVLMConfig) -> dict[str, torch.Tensor]:
    """CogVLM weight names -> LLaMA names, keeping only the language expert."""
    d = config.hidden_size
    out = {
        "model.embed_tokens.weight": state["model.embed_tokens.weight"],
        "model.norm.weight": state["model.norm.weight"],
        "lm_head.weight": state["lm_head.weight"],
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        q, k, v = state[src + "self_attn.language_expert_query_key_value.weight"].split(d, dim=0)
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
    """Write `out` as a LLaMA folder (config.json, safetensors, tokenizer files if present) from a
    model folder or hub id."""
    folder, out = resolve_folder(model, revision), Path(out)
    model = load_model(folder, dtype="auto")
    out.mkdir(parents=True, exist_ok=True)
    save_state_dict(language_state_dict(model.state_dict(), model.config), out, max_shard_size)
    write_json(out / "config.json", llama_config(model.config, model.dtype))
    write_json(
        out / "generation_config.json",
        {
            "bos_token_id": model.config.bos_token_id,
            "eos_token_id": model.config.eos_token_id,
            "pad_token_id": model.config.pad_token_id,
        },
    )
    copy_tokenizer_files(folder, out)
    return out
