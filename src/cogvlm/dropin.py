"""The drop-in `CogVLMForCausalLM`: the official model class's API over our network.

    >>> model = CogVLMForCausalLM.from_pretrained("THUDM/cogvlm-chat-hf", torch_dtype=torch.bfloat16)
    >>> inputs = model.build_conversation_input_ids(tokenizer, query=q, images=[image])
    >>> model.generate(**inputs, max_new_tokens=64)

The official demo snippets run with only the import changed. The network itself stays in
`cogvlm.model`; loading, prompts and generation are the modules that own those jobs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from .generation import generate_sequences
from .loading import load_model
from .loading.files import save_model
from .loading.placement import execution_device
from .model import cogvlm as network
from .prompts import build_conversation_input_ids


class CogVLMForCausalLM(network.CogVLMForCausalLM):
    """The network plus `from_pretrained`, `save_pretrained`, `build_conversation_input_ids`, `generate`."""

    @property
    def device(self) -> torch.device:
        """Where inputs go: the token embedding's device (under a device map, its execution device)."""
        return execution_device(self.model.embed_tokens)

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        torch_dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        *,
        revision: str | None = None,
        low_cpu_mem_usage: bool = True,
        trust_remote_code: bool = True,
        **placement: Any,
    ) -> "CogVLMForCausalLM":
        """A folder or hub id, as transformers loads it (fp32 unless `torch_dtype`; 'auto' is
        config.json's). `low_cpu_mem_usage` and `trust_remote_code` are accepted for the official
        snippets and change nothing: loading is always lean and there is no remote code.
        `placement`: device_map, max_memory, offload_folder, quantize, quantize_vision, local_files_only."""
        return load_model(model, torch_dtype, device, revision=revision, model_class=cls, **placement)

    def save_pretrained(self, folder: str | Path, max_shard_size: int | str = "5GB") -> None:
        """Write the official layout: config.json, safetensors shards and their index."""
        save_model(self, folder, max_shard_size=max_shard_size)

    def build_conversation_input_ids(
        self,
        tokenizer: Any,
        *,
        query: str,
        history: Sequence[tuple[str, str]] | None = None,
        images: Sequence[Any] | None = None,
        template_version: str | None = None,
    ) -> dict[str, Any]:
        """The official prompt builder: input_ids, token_type_ids, attention_mask, images."""
        return build_conversation_input_ids(
            tokenizer, self.config, query=query, history=history, images=images, template_version=template_version
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        images: network.Images = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Prompt + new tokens (B, T + N), as transformers' generate returns them."""
        return generate_sequences(self, input_ids, token_type_ids, attention_mask, images, **kwargs)


__all__ = ["CogVLMForCausalLM"]
