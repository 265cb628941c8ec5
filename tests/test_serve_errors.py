"""Bad input, one test per kind: the status, OpenAI's error envelope, and nothing internal in it
(no traceback, path, address or exception text)."""

from __future__ import annotations

import base64
import io
import json
import zlib

import httpx
import pytest
from PIL import Image

from cogvlm.pipeline import Pipeline
from cogvlm.serve import MediaPolicy, ServeSettings, create_app, running

KEY = "test-key"
LIMIT = 300_000


@pytest.fixture(scope="module")
def client(reference_model, reference_tokenizer):
    settings = ServeSettings(
        model_names=("tiny",),
        api_key=KEY,
        max_body_bytes=LIMIT,
        media=MediaPolicy(max_bytes=100_000, max_pixels=1_000_000),
    )
    with running(create_app(Pipeline(reference_model, reference_tokenizer), settings)) as url:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
            yield c


def png(width: int = 8, height: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "red").save(buffer, format="PNG")
    return buffer.getvalue()


def bomb(side: int = 20000) -> bytes:
    """A valid PNG header for side x side pixels with a tiny, never-decoded body (~1 KB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )


def image_url(url: str, text: str = "Describe this image.") -> dict:
    return {
        "model": "tiny",
        "max_tokens": 2,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}],
            }
        ],
    }


def b64(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


OK = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}


def check(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    """The status and envelope, with a clean message; returns the error object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error = body["error"]
    assert error["message"] and error["type"]
    for leak in ("Traceback", "/work", "site-packages", " at 0x", "0xdeadbeef", "BytesIO", "Error("):
        assert leak not in response.text
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def test_the_valid_request_works(client):
    assert client.post("/v1/chat/completions", json=OK).status_code == 200


def test_invalid_json(client):
    check(
        client.post("/v1/chat/completions", content=b'{"model": "tiny",', headers={"Content-Type": "application/json"}),
        400,
    )


def test_top_level_not_an_object(client):
    check(client.post("/v1/chat/completions", json=[OK]), 400)


@pytest.mark.parametrize(
    "change, param",
    [
        ({"model": None}, "model"),
        ({"messages": None}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "Hi"}, "messages"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        (
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hi"}]},
            "messages.0.role",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]}, "messages.0.content"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x", "detail": "huge"}}]}
                ]
            },
            "messages.0.content",
        ),
        ({"stream": "yes please"}, "stream"),
    ],
)
def test_schema_errors_are_400_not_422(client, change, param):
    request = {k: v for k, v in {**OK, **change}.items() if v is not None}
    error = check(client.post("/v1/chat/completions", json=request), 400)
    assert error["param"].startswith(param)


def test_not_json_content_type(client):
    check(client.post("/v1/chat/completions", content=json.dumps(OK), headers={"Content-Type": "text/plain"}), 400)


def test_unknown_model(client):
    check(client.post("/v1/chat/completions", json={**OK, "model": "gpt-4o"}), 404, "model_not_found", "model")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_missing_or_wrong_api_key(client, headers):
    for path in ("/v1/chat/completions", "/v1/models", "/openapi.json"):
        response = httpx.request(
            "POST" if "chat" in path else "GET", str(client.base_url) + path, json=OK, headers=headers
        )
        check(response, 401, "invalid_api_key")
    assert httpx.get(str(client.base_url) + "/health").status_code == 200  # open: health checks, the page
    assert httpx.get(str(client.base_url) + "/").status_code == 200


def test_body_too_large(client):
    big = {**OK, "messages": [{"role": "user", "content": "x" * LIMIT}]}
    check(client.post("/v1/chat/completions", json=big), 413, "request_too_large")
    chunked = iter([json.dumps(big).encode()])  # no Content-Length: counted while reading
    check(client.post("/v1/chat/completions", content=chunked, headers={"Content-Type": "application/json"}), 413)


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;base64",  # no comma
        "data:image/png," + "iVBORw0KGgo=",  # not base64
        "data:image/png;base64,iVBO!!w0KGgo=",  # characters outside base64
        b64(png(), "text/plain"),  # not an image media type
    ],
)
def test_bad_data_urls(client, url):
    check(client.post("/v1/chat/completions", json=image_url(url)), 400, "invalid_image", "messages")


@pytest.mark.parametrize(
    "data",
    [
        b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,  # a PNG signature, then garbage
        png(64, 64)[:-40],  # truncated
        b"GIF89a" + b"\0" * 10,  # a GIF header with nothing after it
        b"%PDF-1.4 not an image",  # not an image at all
        b"BM" + b"\0" * 60,  # an image, but not an accepted format (BMP)
    ],
)
def test_undecodable_truncated_or_non_image_data(client, data):
    check(client.post("/v1/chat/completions", json=image_url(b64(data))), 400, "invalid_image")


@pytest.mark.parametrize("side", [20000, 2000])  # over PIL's own bomb limit; over this server's cap only
def test_decompression_bomb_is_refused_before_decoding(client, side):
    error = check(client.post("/v1/chat/completions", json=image_url(b64(bomb(side)))), 400, "invalid_image")
    assert "pixels" in error["message"]


def test_image_over_the_byte_cap(client):
    check(client.post("/v1/chat/completions", json=image_url(b64(b"\x89PNG" + bytes(120_000)))), 413, "image_too_large")


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 5},
        {"temperature": -1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"max_tokens": 0},
        {"max_tokens": "many"},
        {"n": 2},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"repetition_penalty": 0},
        {"top_k": -1},
        {"seed": 2**70},
    ],
)
def test_bad_sampling_values(client, change):
    check(client.post("/v1/chat/completions", json={**OK, **change}), 400)


def test_prompt_plus_max_tokens_beyond_the_context(client):
    error = check(
        client.post("/v1/chat/completions", json={**OK, "max_tokens": 2047}), 400, "context_length_exceeded", "messages"
    )
    assert "maximum context length is 2048 tokens" in error["message"]
    long = {**OK, "max_tokens": None, "messages": [{"role": "user", "content": "cat " * 2100}]}
    check(client.post("/v1/chat/completions", json=long), 400, "context_length_exceeded")


@pytest.mark.parametrize(
    "messages",
    [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": b64(png(8, 8))}},
                    {"type": "image_url", "image_url": {"url": b64(png(9, 9))}},
                ],
            }
        ],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": b64(png())}}]},
            {"role": "user", "content": "and?"},
        ],
        [{"role": "user", "content": "Hi"}, {"role": "user", "content": "again"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    ],
)
def test_conversations_cogvlm_cannot_take(client, messages):
    check(client.post("/v1/chat/completions", json={**OK, "messages": messages}), 400)


def test_the_same_image_repeated_counts_once(client):
    part = {"type": "image_url", "image_url": {"url": b64(png())}}
    messages = [
        {"role": "user", "content": [part, {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": [part]},
    ]
    assert client.post("/v1/chat/completions", json={**OK, "messages": messages}).status_code == 200


@pytest.mark.parametrize(
    "url, code",
    [
        ("http://127.0.0.1:9/x.png", "remote_images_disabled"),
        ("https://example.com/x.png", "remote_images_disabled"),
        ("file:///etc/passwd", "invalid_image"),
        ("ftp://example.com/x.png", "invalid_image"),
        ("javascript:alert(1)", "invalid_image"),
        ("/etc/passwd", "invalid_image"),
    ],
)
def test_remote_and_other_schemes_refused_by_default(client, url, code):
    check(client.post("/v1/chat/completions", json=image_url(url)), 400, code, "messages")


def test_unknown_route_and_wrong_method(client):
    check(client.get("/v1/nothing"), 404)
    check(client.get("/v1/chat/completions"), 405)
