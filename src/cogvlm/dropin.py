"""The drop-in `CogVLMForCausalLM`: the official model class's API over our network.

    >>> model = CogVLMForCausalLM.from_pretrained("THUDM/cogvlm-chat-hf", torch_dtype=torch.bfloat16)
    >>> inputs = model.build_conversation_input_ids(tokenizer, query=q, images=[image])
    >>> model.generate(**inputs, max_new_tokens=64)

The official demo snippets run with only the import changed. The network itself stays in
`cogvlm.model`; loading, prompts and generation are the modules that own those jobs.

`generate` decodes as transformers' does: what a call leaves out comes from
`model.generation_config`, which is transformers' defaults overlaid with the folder's
generation_config.json. CogVLM-1's file holds only token ids, so it stays greedy; CogVLM2's
samples (temperature 0.6, top-p 0.9, and transformers' top-k 50) unless the call says
`do_sample=False`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .generation import generate_sequences
from .loading import generation_defaults, load_model
from .loading.files import save_model
from .loading.placement import execution_device
from .model import cogvlm as network
from .prompts import build_conversation_input_ids


@dataclass
class GenerationDefaults:
    """transformers' `GenerationConfig` defaults for the fields `generate` reads; `from_folder`
    overlays a folder's generation_config.json as transformers reads it (`max_length` counts
    the prompt; `max_new_tokens`, when set, wins over it)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    max_length: int = 20
    max_new_tokens: int | None = None

    @classmethod
    def from_folder(cls, folder: str | Path) -> "GenerationDefaults":
        return cls(**generation_defaults(Path(folder)))


class CogVLMForCausalLM(network.CogVLMForCausalLM):
    """The network plus `from_pretrained`, `save_pretrained`, `build_conversation_input_ids`,
    `generate` and `generation_config`."""

    @property
    def generation_config(self) -> GenerationDefaults:
        """What `generate` uses for what a call does not pass (transformers' `model.generation_config`):
        read once from the folder the model was loaded from, transformers' defaults otherwise.
        Assignable, and its fields too (`model.generation_config.do_sample = False`)."""
        found = self.__dict__.get("_generation_config")
        if found is None:
            folder = getattr(self, "name_or_path", "")
            found = GenerationDefaults.from_folder(folder) if folder and Path(folder).is_dir() else GenerationDefaults()
            self.__dict__["_generation_config"] = found
        return found

    @generation_config.setter
    def generation_config(self, value: GenerationDefaults) -> None:
        self.__dict__["_generation_config"] = value

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
        `placement`: device_map, max_memory, offload_folder, quantize, quantize_vision, local_files_only.
        The folder's generation_config.json becomes `generation_config` (read now, so a bad file fails here)."""
        net = load_model(model, torch_dtype, device, revision=revision, model_class=cls, **placement)
        net.generation_config = GenerationDefaults.from_folder(net.name_or_path)
        return net

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
        """Prompt + new tokens (B, T + N), as transformers' generate returns them. Settings the call
        leaves out come from `generation_config` (the folder's file over transformers' defaults):
        `do_sample=False` is greedy whatever the folder says; `max_new_tokens` wins over `max_length`."""
        settings = {**dataclasses.asdict(self.generation_config), **kwargs}
        max_length, max_new = settings.pop("max_length"), settings.pop("max_new_tokens")
        if max_new is None:
            max_new = max((max_length or 20) - input_ids.shape[1], 1)
        return generate_sequences(
            self, input_ids, token_type_ids, attention_mask, images, max_new_tokens=max_new, **settings
        )


__all__ = ["CogVLMForCausalLM", "GenerationDefaults"]
