"""The Python API one level above the model: load once, then chat, batch, stream, ground.

>>> vlm = cogvlm.load()                      # the shipped default model
>>> vlm.chat("What color is the star?", image="examples/scene.png")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from . import loading
from .dropin import CogVLMForCausalLM
from .errors import PromptError
from .generation import (
    BatchDecoder,
    BeamSettings,
    DecodeState,
    GenerationConfig,
    ImageFeatureCache,
    beam_search,
)
from .grounding import Box, parse_boxes
from .image import ImageInput, load_image
from .loading import DEFAULT_MODEL, LoadOptions
from .prompts import History, build_conversation_input_ids, collate
from .streaming import TextStream
from .tokenizer import stop_token_ids


@dataclass
class GroundingResult:
    """An answer and the boxes in it (normalised, and in pixels of the original image)."""

    text: str
    boxes: list[Box]
    width: int
    height: int

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "boxes": [b.to_dict(self.width, self.height) for b in self.boxes]}


class Pipeline:
    """A loaded model and tokenizer with the everyday calls; images are PIL, paths or bytes.
    `image_cache` keeps the features of recent pictures, so asking about one again (the next turn
    of a chat, more questions in a batch) does not encode it again. With `keep_prefix` (the
    default), a one-request call (chat, stream) decodes in a KV cache of one slot of the context
    that the pipeline keeps, with the [BOS, image] prefix of its last image: the next turn about
    that image prefills only its text. `clear()` drops both. One caller at a time (a thread per
    pipeline; the server's engine is its model's only user)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        generation: GenerationConfig | None = None,
        context_length: int | None = None,
        image_cache: ImageFeatureCache | None = None,
    ) -> None:
        """`context_length` caps prompt + answer (default: config.max_position_embeddings);
        `image_cache` defaults to one of `features.DEFAULT_MAX_BYTES` (128 MiB)."""
        self.model, self.tokenizer = model, tokenizer
        self.context_length = context_length or model.config.max_position_embeddings
        self.generation = generation or GenerationConfig(max_new_tokens=self.context_length)
        self.image_cache = ImageFeatureCache() if image_cache is None else image_cache
        self.keep_prefix = True
        self._kept: DecodeState | None = None  # a one-request call's state, between calls

    def clear(self) -> None:
        """Forget the kept image features and the kept KV cache (after changing the weights)."""
        self.image_cache.clear()
        self._kept = None

    # ---- building requests --------------------------------------------------------------------

    def build(
        self,
        query: str,
        image: ImageInput | None = None,
        history: History | None = None,
        template_version: str | None = None,
    ) -> dict[str, Any]:
        """One request's model inputs (see prompts.build_conversation_input_ids)."""
        images = None if image is None else [load_image(image)]
        return build_conversation_input_ids(
            self.tokenizer,
            self.model.config,
            query=query,
            history=[tuple(h) for h in history or []],
            images=images,
            template_version=template_version,
        )

    def _config(self, sample: dict[str, Any], gen: dict[str, Any]) -> GenerationConfig:
        stop = gen.pop("stop", None)
        config = self.generation.replace(**gen)
        if stop is not None:
            config = config.replace(stop=(stop,) if isinstance(stop, str) else tuple(stop))
        room = self.context_length - len(sample["input_ids"])
        if room < 1:
            raise PromptError(
                f"prompt too long: {len(sample['input_ids'])} tokens, the context is "
                f"{self.context_length} (an image takes {self.model.config.image_tokens})"
            )
        return config.replace(max_new_tokens=min(config.max_new_tokens, room))

    # ---- running -----------------------------------------------------------------------------

    def generate(
        self, samples: Sequence[dict[str, Any]], configs: Sequence[GenerationConfig]
    ) -> Iterator[tuple[int, str]]:
        """Run built samples together; yields (row, text piece) as tokens arrive."""
        pad = self.tokenizer.pad_token_id
        batch = collate(samples, pad_token_id=self.model.config.pad_token_id if pad is None else pad)
        batch["image_features"] = self._features(batch["images"])
        eos = stop_token_ids(self.tokenizer, self.model.config)  # CogVLM2: either of two ends an answer
        keep = self.keep_prefix and len(samples) == 1
        if keep and self._kept is None:
            self._kept = DecodeState(self.model, 1, self.context_length)
        state, self._kept = (self._kept, None) if keep else (None, self._kept)  # a call left unfinished keeps none
        decoder = BatchDecoder(self.model, batch, configs, tuple(eos), share_prefix=True, state=state)
        streams = [TextStream(self.tokenizer, c.stop) for c in configs]
        for step in decoder:
            for row, token in step.items():
                if token in eos:  # ends the row; never shown
                    continue
                piece = streams[row].push(token)
                if streams[row].stopped:
                    decoder.finish(row)
                if piece:
                    yield row, piece
        for row, stream in enumerate(streams):
            rest = stream.finish()
            if rest:
                yield row, rest
        if keep:
            self._kept = state

    def batch(self, requests: Sequence[dict[str, Any]], **gen: Any) -> list[str]:
        """Answers to many requests at once; each is a dict with `query`, `image`, `history`
        (and optionally `template_version`). Equal to running each alone (greedy)."""
        samples = [
            self.build(r["query"], r.get("image"), r.get("history"), r.get("template_version")) for r in requests
        ]
        search = {k: gen.pop(k) for k in ("num_beams", "length_penalty", "early_stopping") if k in gen}
        configs = [self._config(s, dict(gen)) for s in samples]
        if search.get("num_beams", 1) > 1:
            return self._beam_answers(samples, configs, **search)
        answers = [""] * len(samples)
        for row, piece in self.generate(samples, configs):
            answers[row] += piece
        return answers

    def _features(self, images: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor | None:
        """The batch's image features (N, G + 2, D), from `image_cache` where it has them."""
        return self.image_cache(self.model, [[img.to(self.model.dtype) for img in imgs] for imgs in images])

    def _beam_answers(
        self,
        samples: Sequence[dict[str, Any]],
        configs: Sequence[GenerationConfig],
        num_beams: int,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
    ) -> list[str]:
        """Each request's best beam (`batch(..., num_beams=N)`), as text with its stop strings applied."""
        pad = self.tokenizer.pad_token_id
        batch = collate(samples, pad_token_id=self.model.config.pad_token_id if pad is None else pad)
        batch["image_features"] = self._features(batch["images"])
        eos = stop_token_ids(self.tokenizer, self.model.config)
        settings = BeamSettings(num_beams, min(c.max_new_tokens for c in configs), length_penalty, early_stopping)
        answers = []
        for config, (best, *_) in zip(configs, beam_search(self.model, batch, settings, tuple(eos))):
            stream = TextStream(self.tokenizer, config.stop)
            text = "".join(stream.push(t) for t in best.tokens if t not in eos and not stream.stopped)
            answers.append(text + stream.finish())
        return answers

    def chat(
        self,
        query: str,
        image: ImageInput | None = None,
        history: History | None = None,
        template_version: str | None = None,
        **gen: Any,
    ) -> str:
        """One answer; history is a list of (question, answer) pairs."""
        return "".join(self.stream(query, image, history, template_version, **gen))

    def stream(
        self,
        query: str,
        image: ImageInput | None = None,
        history: History | None = None,
        template_version: str | None = None,
        **gen: Any,
    ) -> Iterator[str]:
        """The answer as text pieces while it is generated; they concatenate to `chat`'s answer."""
        sample = self.build(query, image, history, template_version)
        config = self._config(sample, dict(gen))
        for _, piece in self.generate([sample], [config]):
            yield piece

    def ground(self, image: ImageInput, query: str, **gen: Any) -> GroundingResult:
        """Ask the grounding prompt (base template) and parse the boxes from the answer."""
        picture = load_image(image)
        text = self.chat(query, picture, template_version=gen.pop("template_version", "base"), **gen)
        return GroundingResult(text, parse_boxes(text), picture.width, picture.height)


def load(
    model: str | Path | LoadOptions | None = None,
    tokenizer: str | Path | Any | None = None,
    device: str | torch.device | None = "auto",
    dtype: torch.dtype | str | None = None,
    progress: bool = False,
    **options: Any,
) -> Pipeline:
    """Load a model (folder or hub id; default: the shipped tiny model) and its tokenizer into a
    Pipeline. `options`: the other `LoadOptions` fields (revision, local_files_only, device_map,
    max_memory, offload_folder, quantize, quantize_vision); or pass one `LoadOptions` as `model`.
    Generation defaults come from the folder's generation_config.json, as transformers reads it."""
    if not isinstance(model, LoadOptions):
        model = LoadOptions(model=model, tokenizer=tokenizer, device=device, dtype=dtype, progress=progress, **options)
    loaded = loading.load(model, model_class=CogVLMForCausalLM)
    defaults = dict(loaded.generation)
    context = min(loaded.model.config.max_position_embeddings, defaults.pop("max_length", 10**9))
    defaults.setdefault("max_new_tokens", context)
    vlm = Pipeline(loaded.model, loaded.tokenizer, GenerationConfig(**defaults), context)
    vlm.folder, vlm.placement = loaded.folder, loaded.placement
    return vlm


__all__ = ["Pipeline", "GroundingResult", "load", "LoadOptions", "DEFAULT_MODEL"]
