"""The CogVLM network: vision tower, adapter, decoder with visual experts, and the glue."""

from .cogvlm import CausalLMOutput, CogVLMForCausalLM, CogVLMModel, on_meta
from .decoder import CogVLMDecoderLayer
from .vision import TransformerLayer

__all__ = ["CausalLMOutput", "CogVLMForCausalLM", "CogVLMModel", "CogVLMDecoderLayer", "TransformerLayer", "on_meta"]
