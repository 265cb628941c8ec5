"""CogVLM: a LLaMA decoder with a *visual expert* in every layer, fed by an EVA2-CLIP ViT.

What is special, in five lines:
- Visual experts: each decoder layer has separate QKV, attention-output and MLP weights for
  image tokens; text tokens use the original LLM weights, so text-only input is plain LLaMA.
- EVA2-CLIP uses post-sublayer norm (`x + LN(f(x))`) and no final norm.
- A GLU adapter maps ViT features to the decoder width; learned boi/eoi tokens wrap the image.
- All patch tokens of an image share one position id (boi and eoi take their own).
- token_type_ids (0 text, 1 image) pick the expert and the positions; they travel unchanged.
CogVLM2 is this network configured (config.py): Llama-3 with grouped-query attention, a bias on
the vision expert's QKV, and a stride-2 conv that quarters the image tokens before the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from ..config import VISION_TOKEN_TYPE, CogVLMConfig
from .decoder import CogVLMDecoderLayer, LayerCache, RMSNorm
from .positions import attention_mask_4d, build_position_ids, vision_expert_mask
from .vision import EVA2CLIPModel

#: Per-sample lists of images (official format, `[[img], [], ...]`) or one stacked (N, 3, S, S).
Images = Sequence[Sequence[torch.Tensor]] | torch.Tensor | None


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # (B, T, V) fp32
    loss: torch.Tensor | None = None


class CogVLMModel(nn.Module):
    def __init__(self, config: CogVLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(CogVLMDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.vision = EVA2CLIPModel(config)
        self.gradient_checkpointing = False

    def encode_images(self, images: Images) -> torch.Tensor | None:
        """Images -> (N, G + 2, D) image tokens (G = config.image_grid ** 2), or None when there are none."""
        if images is None:
            return None
        if not isinstance(images, torch.Tensor):
            flat = [img for sample in images for img in sample]
            if not flat:
                return None
            images = torch.stack(flat)
        if images.shape[0] == 0:
            return None
        # The tower's device and dtype (not the patch conv's weight: on a CPU without bf16 arithmetic
        # inference widens it to fp32). An offloaded weight waits on 'meta'; whoever offloaded it
        # moves the inputs too.
        weight = self.vision.patch_embedding.cls_embedding
        images = images.to(device=None if weight.device.type == "meta" else weight.device, dtype=weight.dtype)
        return self.vision(images)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images: Images = None,
        kv_cache: Sequence[LayerCache] | None = None,
        cache_start: int = 0,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, T, D) after the final norm. Images are used only without a past;
        `image_features` (N, G + 2, D), `encode_images`' output kept from before, stand in for them."""
        x = self.embed_tokens(input_ids)  # (B, T, D)
        is_image = token_type_ids == VISION_TOKEN_TYPE
        features = None
        if cache_start == 0:
            features = self.encode_images(images) if image_features is None else image_features
        n_image_tokens = int(is_image.sum())
        n_features = 0 if features is None else features.shape[0] * features.shape[1]
        if cache_start == 0 and n_image_tokens != n_features:
            raise ValueError(
                f"{n_image_tokens} image-typed tokens but {n_features} image features "
                "(each image needs config.image_tokens placeholders)"
            )
        if features is not None:
            x = x.index_put(
                (is_image.to(x.device),),  # row-major; the tower may sit on another device
                features.reshape(-1, x.shape[-1]).to(x.device, x.dtype),
            )
        vision_mask = vision_expert_mask(token_type_ids)
        attn_mask, is_causal = attention_mask_4d(attention_mask, x.shape[1], cache_start, x.device)
        for i, layer in enumerate(self.layers):
            cache = None if kv_cache is None else kv_cache[i]
            args = (x, position_ids, vision_mask, attn_mask, is_causal, cache, cache_start)
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        return self.norm(x)


class CogVLMForCausalLM(nn.Module):
    """The whole network with the official module names (the drop-in methods: `cogvlm.dropin`)."""

    def __init__(self, config: CogVLMConfig) -> None:
        super().__init__()
        self.config = config
        self.model = CogVLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @torch.no_grad()
    def init_weights(self, only: Callable[[str], bool] | None = None) -> "CogVLMForCausalLM":
        """Random init for training from scratch: the official `_init_weights` (normal(0,
        initializer_range) for Linear and Embedding weights, zero biases and padding row),
        extended to the patch conv and the free vectors (cls, boi, eoi) so no input is all zero;
        norm weights one. `only`, a test on parameter names, re-draws just the matching modules."""
        std = self.config.initializer_range
        for name, module in self.named_modules():
            if only is not None and not only(f"{name}.weight"):
                continue
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
        vision = self.model.vision
        for name in ("patch_embedding.cls_embedding", "boi", "eoi"):
            if only is None or only(f"model.vision.{name}"):
                vision.get_parameter(name).normal_(0.0, std)
        return self

    @property
    def device(self) -> torch.device:
        """The token embedding's device (the loaders' drop-in face also knows offloaded ones)."""
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        images: Images = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        kv_cache: Sequence[LayerCache] | None = None,
        cache_start: int = 0,
        logits_to_keep: int = 0,
        image_features: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """input_ids, token_type_ids, attention_mask (B, T) -> logits (B, T, V) in fp32.

        With `kv_cache`, keys and values are written at positions cache_start.. and the
        attention mask must cover all cache_start + T positions. `logits_to_keep` > 0 computes
        only the last that many positions' logits. Labels (B, T) give the shifted LM loss.
        `image_features` (N, G + 2, D) stand in for `images` (see `CogVLMModel.forward`).
        """
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if position_ids is None:
            position_ids = build_position_ids(token_type_ids, attention_mask)
        hidden = self.model(
            input_ids, token_type_ids, position_ids, attention_mask, images, kv_cache, cache_start, image_features
        )
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        return CausalLMOutput(logits=logits, loss=loss)


Model = TypeVar("Model", bound=nn.Module)


def on_meta(model_class: type[Model], config: CogVLMConfig) -> Model:
    """`model_class(config)` on the meta device: names and shapes, no memory (for loading and
    planning). The modules' random init is skipped: there it computes nothing, and the meta
    device's `normal_` imports torch._dynamo, 2.5 s of every command that loads a model."""
    with torch.device("meta"), _NoRandomInit():
        return model_class(config)


class _NoRandomInit(TorchFunctionMode):
    """`torch.nn.init`'s functions on a meta tensor return it as it is (nothing to draw)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        tensor = args[0] if args else kwargs.get("tensor")
        if getattr(func, "__module__", None) == "torch.nn.init" and isinstance(tensor, torch.Tensor) and tensor.is_meta:
            return tensor
        return func(*args, **kwargs)
