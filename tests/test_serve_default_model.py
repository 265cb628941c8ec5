"""The server with the shipped default model, through the real `openai` client: plain and
streamed answers equal the Pipeline's, and grounding answers carry structured boxes."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image

import cogvlm
from cogvlm.eval.metrics.grounding import box_iou
from cogvlm.serve import ServeSettings, create_app, running

SCENE = Path(__file__).resolve().parents[1] / "examples" / "scene.png"


@pytest.fixture(scope="module")
def vlm():
    return cogvlm.load(device="cpu")


@pytest.fixture(scope="module")
def client(vlm):
    with running(create_app(vlm, ServeSettings(model_names=("tiny-shapes",)))) as base:
        yield openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


def ask(text: str) -> list[dict]:
    buffer = io.BytesIO()
    Image.open(SCENE).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return [
        {"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}
    ]


def test_models_and_answers(client, vlm):
    assert [m.id for m in client.models.list().data] == ["tiny-shapes"]
    reply = client.chat.completions.create(model="tiny-shapes", messages=ask("What color is the circle?"), max_tokens=8)
    expected = vlm.chat("What color is the circle?", SCENE, max_new_tokens=8)
    assert reply.choices[0].message.content == expected and expected
    stream = client.chat.completions.create(
        model="tiny-shapes",
        messages=ask("Describe the image."),
        max_tokens=40,
        stream=True,
        extra_body={"template_version": "chat"},
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == vlm.chat("Describe the image.", SCENE, template_version="chat", max_new_tokens=40)


def test_grounding_boxes(client, vlm):
    reply = client.chat.completions.create(
        model="tiny-shapes",
        messages=ask("Where is the black circle?"),
        max_tokens=32,
        extra_body={"template_version": "base"},
    )
    message = reply.choices[0].message
    assert message.content == vlm.chat("Where is the black circle?", SCENE, template_version="base", max_new_tokens=32)
    assert "[[" in message.content
    boxes = message.model_extra["boxes"]
    assert boxes, message.content
    # The circle is the scene's only black shape (README's grounding example): its box is where the
    # near-black pixels are. This depends on the model (68% Acc@0.5 held out; the red star of the
    # same scene it boxes at IoU 0.33).
    rgb = np.asarray(Image.open(SCENE).convert("RGB"), dtype=int)
    ys, xs = np.nonzero(rgb.sum(-1) < 120)
    circle = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert box_iou(boxes[0]["pixels"], circle) >= 0.5, (boxes[0], circle)
