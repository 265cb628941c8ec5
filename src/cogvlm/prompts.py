"""Prompt templates and `build_conversation_input_ids`, exactly as the official model builds them.

Layout of one sample: `[bos]` + (if an image) `image_tokens` placeholders with token type 1 +
the encoded prompt text (type 0, no special tokens added); no eos. The placeholder id is the
tokenizer's pad id for CogVLM-1 and 128002 for CogVLM2 (`config.image_token_id`), as their
official code has it. The templates are the same for both families:
- base: the query verbatim (history ignored);
- vqa:  `Question: {q} Short answer: {a}\\n` per past turn, then `Question: {query} Short answer:`;
- chat: the same with `Answer:`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .config import LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE, CogVLMConfig
from .errors import PromptError
from .image import ImageInput, load_image, preprocess

TEMPLATES = ("base", "chat", "vqa")
_ANSWER_TAG = {"chat": "Answer:", "vqa": "Short answer:"}

History = Sequence[tuple[str, str]]

#: The grounding model's prompt families (its training templates, spec section 5).
GROUNDED_CAPTION = (
    "Can you provide a description of the image and include the coordinates [[x0,y0,x1,y1]] for each mentioned object?"
)
WHERE_IS = "Where is {expr}?"
BOX_TO_CAPTION = "Tell me what you see within the designated area {box} in the picture."


def where_is_query(expression: str) -> str:
    """'the red circle' -> 'Where is the red circle?'; a full question is kept as written."""
    expression = expression.strip()
    return expression if expression.endswith("?") else WHERE_IS.format(expr=expression)


def box_to_caption_query(box: str, width: int, height: int) -> str:
    """'X0,Y0,X1,Y1' in pixels -> the box-to-caption question with the box in [[...]] notation."""
    from .grounding import format_box, pixel_to_normalised

    try:
        x0, y0, x1, y1 = (float(v) for v in box.split(","))
    except ValueError:
        raise PromptError(f"bad box '{box}': expected X0,Y0,X1,Y1 in pixels") from None
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise PromptError(f"box {box} is not inside the {width}x{height} image")
    return BOX_TO_CAPTION.format(box=format_box(pixel_to_normalised((x0, y0, x1, y1), width, height)))


def format_prompt(query: str, history: History | None, template_version: str) -> str:
    """The prompt text of one turn, with the history before it."""
    if template_version not in TEMPLATES:
        raise PromptError(f"unknown template_version '{template_version}' (use base, chat or vqa)")
    if template_version == "base":
        return query
    tag = _ANSWER_TAG[template_version]
    past = "".join(f"Question: {q} {tag} {a}\n" for q, a in (history or []))
    return f"{past}Question: {query} {tag}"


def build_conversation_input_ids(
    tokenizer: Any,
    config: CogVLMConfig,
    *,
    query: str,
    history: History | None = None,
    images: Sequence[ImageInput] | None = None,
    template_version: str | None = None,
) -> dict[str, Any]:
    """Returns input_ids, token_type_ids, attention_mask (int64, 1-D) and images ([float32
    (3, S, S)] or None), as the official method of the same name."""
    template_version = template_version or config.template_version
    if images is not None and len(images) > 1:
        raise PromptError(f"{len(images)} images given; CogVLM takes at most one per conversation")
    ids = [tokenizer.bos_token_id]
    types = [LANGUAGE_TOKEN_TYPE]
    pixels = None
    if images:
        pixels = [preprocess(load_image(images[0]), config.vision_config.image_size)]
        placeholder = tokenizer.pad_token_id if config.image_token_id is None else config.image_token_id
        ids += [placeholder] * config.image_tokens
        types += [VISION_TOKEN_TYPE] * config.image_tokens
    text = tokenizer.encode(format_prompt(query, history, template_version), add_special_tokens=False)
    ids += list(text)
    types += [LANGUAGE_TOKEN_TYPE] * len(text)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "token_type_ids": torch.tensor(types, dtype=torch.long),
        "attention_mask": torch.ones(len(ids), dtype=torch.long),
        "images": pixels,
    }


def collate(samples: Sequence[dict[str, Any]], pad_token_id: int = 0) -> dict[str, Any]:
    """Left-pad built samples into a batch: input_ids, token_type_ids, attention_mask (B, T) and
    images as the official per-sample lists. Padding: pad id, token type 0, mask 0."""
    length = max(len(s["input_ids"]) for s in samples)

    def pad(key: str, value: int) -> torch.Tensor:
        rows = [torch.cat((torch.full((length - len(s[key]),), value, dtype=torch.long), s[key])) for s in samples]
        return torch.stack(rows)

    return {
        "input_ids": pad("input_ids", pad_token_id),
        "token_type_ids": pad("token_type_ids", LANGUAGE_TOKEN_TYPE),
        "attention_mask": pad("attention_mask", 0),
        "images": [list(s["images"] or []) for s in samples],
    }
