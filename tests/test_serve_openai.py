"""The server through the real `openai` client and the official CogVLM demo's requests, on a
live uvicorn with the reference-tiny model: answers equal the Pipeline's."""

from __future__ import annotations

import base64
import io
import json

import httpx
import openai
import pytest
from PIL import Image

from cogvlm.pipeline import Pipeline
from cogvlm.serve import ServeSettings, create_app, running


@pytest.fixture(scope="module")
def vlm(reference_model, reference_tokenizer):
    return Pipeline(reference_model, reference_tokenizer)


@pytest.fixture(scope="module")
def url(vlm):
    settings = ServeSettings(model_names=("reference-tiny", "cogvlm-chat-17b"))
    with running(create_app(vlm, settings)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def picture(reference_dir):
    return Image.open(reference_dir / "images" / "img0.png").convert("RGB")


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def user(text: str, image: Image.Image | str | None = None) -> dict:
    """A user message; `image` a PIL image (sent as PNG) or a data URL."""
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.append(
            {"type": "image_url", "image_url": {"url": image if isinstance(image, str) else data_url(image)}}
        )
    return {"role": "user", "content": content}


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["reference-tiny", "cogvlm-chat-17b"]
    assert client.models.retrieve("reference-tiny").owned_by == "cogvlm"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_plain_answer_equals_the_pipeline(client, vlm, picture):
    reply = client.chat.completions.create(
        model="reference-tiny", max_tokens=24, messages=[user("Describe this image.", picture)]
    )
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert choice.message.content == vlm.chat("Describe this image.", picture, max_new_tokens=24)
    prompt = len(vlm.build("Describe this image.", picture)["input_ids"])  # image tokens included
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt, 24)
    assert reply.usage.total_tokens == prompt + 24


def test_streaming_equals_plain(client, picture):
    messages = [user("What color is the star?", picture)]
    plain = client.chat.completions.create(model="reference-tiny", max_tokens=30, messages=messages)
    chunks = list(
        client.chat.completions.create(
            model="reference-tiny",
            max_tokens=30,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30


def test_multi_turn_history(client, vlm, picture):
    history = [("What is in the image?", "a red cat."), ("Is it big?", "no, small.")]
    messages = [
        user(history[0][0], picture),
        {"role": "assistant", "content": history[0][1]},
        {"role": "user", "content": history[1][0]},
        {"role": "assistant", "content": history[1][1]},
        {"role": "user", "content": "Where is it?"},
    ]
    reply = client.chat.completions.create(model="reference-tiny", max_tokens=20, messages=messages)
    assert reply.choices[0].message.content == vlm.chat("Where is it?", picture, history, max_new_tokens=20)


def test_stop_seed_and_template(client, vlm, picture):
    greedy = vlm.chat("Describe this image.", picture, template_version="vqa", max_new_tokens=40)
    stop = greedy[10:13]
    reply = client.chat.completions.create(
        model="reference-tiny",
        max_tokens=40,
        stop=[stop],
        messages=[user("Describe this image.", picture)],
        extra_body={"template_version": "vqa"},
    )
    assert reply.choices[0].message.content == greedy[: greedy.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    sampled = [
        client.chat.completions.create(
            model="reference-tiny", max_tokens=20, temperature=1.2, seed=11, messages=[user("Hi")]
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1] == vlm.chat("Hi", max_new_tokens=20, do_sample=True, temperature=1.2, seed=11)
    others = {
        client.chat.completions.create(
            model="reference-tiny", max_tokens=20, temperature=1.2, seed=seed, messages=[user("Hi")]
        )
        .choices[0]
        .message.content
        for seed in (12, 13, 14)
    }
    assert others - {sampled[0]}, "different seeds must draw different answers (temperature 1.2, random model)"


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "GIF"])
def test_image_formats(client, vlm, picture, fmt):
    """Each format answers as its own pixels sent as PNG (JPEG and GIF change the pixels; the
    answer must follow the decoded image, not the bytes' format)."""
    url = data_url(picture, fmt)
    pixels = Image.open(io.BytesIO(base64.b64decode(url.split(",")[1]))).convert("RGB")
    answers = [
        client.chat.completions.create(model="reference-tiny", max_tokens=12, messages=[user("Describe.", image)])
        .choices[0]
        .message.content
        for image in (url, pixels)
    ]
    assert answers[0] == answers[1] == vlm.chat("Describe.", pixels, max_new_tokens=12)


def test_errors_reach_the_client_as_openai_errors(client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=[user("Hi")])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="reference-tiny", messages=[user("Hi")], max_tokens=5000)
    assert too_long.value.code == "context_length_exceeded"


def test_the_official_demo_requests(url, vlm, picture):
    """openai_demo/openai_api_request.py: JPEG data URL, history, sampling settings, its model id,
    `repetition_penalty`; read as that script does (non-streaming, and `data:` lines)."""
    image = data_url(picture, "JPEG")
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What's in this image?"},
                {"type": "image_url", "image_url": {"url": image}},
            ],
        },
        {"role": "assistant", "content": "A wooden boardwalk."},
        {"role": "user", "content": "Do you think this is a spring or winter photo?"},
    ]
    data = {
        "model": "cogvlm-chat-17b",
        "messages": messages,
        "stream": False,
        "max_tokens": 16,
        "temperature": 0.8,
        "top_p": 0.8,
        "repetition_penalty": 1.1,
    }
    reply = httpx.post(f"{url}/v1/chat/completions", json=data)
    assert reply.status_code == 200
    assert isinstance(reply.json().get("choices", [{}])[0].get("message", "").get("content", ""), str)
    pieces = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**data, "stream": True}) as response:
        for line in response.iter_lines():
            if line and line[6:] != "[DONE]":
                pieces.append(json.loads(line[6:]).get("choices", [{}])[0].get("delta", {}).get("content", ""))
    assert len(pieces) >= 3 and all(isinstance(p, (str, type(None))) for p in pieces)
    greedy = {**data, "temperature": 0, "repetition_penalty": 1.0}
    answer = httpx.post(f"{url}/v1/chat/completions", json=greedy).json()["choices"][0]["message"]["content"]
    history = [("What's in this image?", "A wooden boardwalk.")]
    assert answer == vlm.chat(
        messages[-1]["content"],
        Image.open(io.BytesIO(base64.b64decode(image.split(",")[1]))),
        history,
        max_new_tokens=16,
    )


def test_health_and_page(url):
    assert httpx.get(url + "/health").json() == {"status": "ready", "running": 0, "waiting": 0}
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "<title>CogVLM chat</title>" in page.text
    assert httpx.get(url + "/static/app.js").status_code == 200
