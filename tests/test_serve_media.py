"""Images from image_url: accepted formats, and remote fetching with its address policy, time,
size and redirect limits, against a local HTTP server (loopback only)."""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import time
from dataclasses import replace

import httpx
import pytest
from PIL import Image
from werkzeug import Response

from cogvlm.pipeline import Pipeline
from cogvlm.serve import MediaPolicy, ServeSettings, create_app, running
from cogvlm.serve.media import decode_image, fetch_image, is_public
from cogvlm.serve.protocol import APIError

LOOPBACK = MediaPolicy(allow_remote=True, allow_networks=("127.0.0.1/32",), timeout_s=1.0, max_bytes=50_000)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


PNG = encode(Image.new("RGB", (12, 10), (200, 30, 40)), "PNG")


def fetch(url: str, policy: MediaPolicy = LOOPBACK) -> Image.Image:
    return asyncio.run(fetch_image(url, policy))


def refused(url: str, policy: MediaPolicy = LOOPBACK) -> APIError:
    with pytest.raises(APIError) as caught:
        fetch(url, policy)
    assert caught.value.status == 400 and "127.0.0" not in caught.value.message
    return caught.value


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_accepted_formats(fmt):
    image = decode_image(encode(Image.new("RGB", (12, 10), (200, 30, 40)), fmt), MediaPolicy())
    assert image.mode == "RGB" and image.size == (12, 10)


def test_an_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(data, MediaPolicy()).getpixel((4, 4))[0] > 200


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.9.9.9",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "192.0.2.1",
        "::",
        "::1",
        "fe80::1",
        "fc00::1",
        "fd00:ec2::254",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "2002:7f00:1::1",
        "2002:a9fe:a9fe::1",
        "64:ff9b::7f00:1",
        "64:ff9b::a9fe:a9fe",
        "2001:db8::1",
    ],
)
def test_non_public_addresses(address):
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]
)
def test_public_addresses(address):
    assert is_public(ipaddress.ip_address(address))


def test_a_remote_image_is_fetched_when_its_network_is_allowed(httpserver):
    httpserver.expect_request("/cat.png").respond_with_data(PNG, content_type="image/png")
    assert fetch(httpserver.url_for("/cat.png")).size == (12, 10)


def test_loopback_is_refused_without_the_test_override(httpserver):
    httpserver.expect_request("/cat.png").respond_with_data(PNG, content_type="image/png")
    error = refused(httpserver.url_for("/cat.png"), MediaPolicy(allow_remote=True))
    assert error.code == "image_url_refused"
    assert not httpserver.log, "no request reached the refused address"


def test_every_redirect_hop_is_checked(httpserver):
    other = f"http://127.0.0.2:{httpserver.port}/cat.png"  # loopback too, but not in the allowed network
    httpserver.expect_request("/hop").respond_with_response(Response(status=302, headers={"Location": other}))
    httpserver.expect_request("/cat.png").respond_with_data(PNG, content_type="image/png")
    assert refused(httpserver.url_for("/hop")).code == "image_url_refused"
    assert [r.path for r, _ in httpserver.log] == ["/hop"]
    httpserver.expect_request("/good").respond_with_response(Response(status=301, headers={"Location": "/cat.png"}))
    assert fetch(httpserver.url_for("/good")).size == (12, 10)


def test_redirect_limit(httpserver):
    httpserver.expect_request("/loop").respond_with_response(Response(status=302, headers={"Location": "/loop"}))
    assert "redirects more than 3 times" in refused(httpserver.url_for("/loop")).message
    assert len(httpserver.log) == 4


def test_a_slow_server_times_out(httpserver):
    def slow(request):
        time.sleep(1.0)
        return Response(PNG, content_type="image/png")

    httpserver.expect_request("/slow.png").respond_with_handler(slow)
    started = time.monotonic()
    assert "timed out" in refused(httpserver.url_for("/slow.png"), replace(LOOPBACK, timeout_s=0.3)).message
    assert time.monotonic() - started < 0.9
    while not httpserver.log:  # the test server answers one request at a time: let it finish
        time.sleep(0.05)


@pytest.mark.parametrize(
    "respond, words",
    [
        (lambda s: s.respond_with_data(b"\x89PNG" + bytes(60_000), content_type="image/png"), "over the limit"),
        (lambda s: s.respond_with_data(b"no", status=404), "HTTP 404"),
        (lambda s: s.respond_with_data(b"boom", status=500), "HTTP 500"),
        (lambda s: s.respond_with_data(b"<html></html>", content_type="text/html"), "did not answer with an image"),
        (
            lambda s: s.respond_with_data(b"plain text, not an image", content_type="application/octet-stream"),
            "not a PNG, JPEG, WebP or GIF",
        ),
    ],
)
def test_bad_remote_answers(httpserver, respond, words):
    respond(httpserver.expect_request("/x"))
    assert words in refused(httpserver.url_for("/x")).message


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://127.0.0.1/x.png", "gopher://127.0.0.1/", "http://", "http://[::1/x"]
)
def test_other_schemes_and_broken_urls(url):
    refused(url)


def test_end_to_end_a_fetched_image_answers_as_the_same_image_sent_inline(
    httpserver, reference_model, reference_tokenizer, reference_dir
):
    data = (reference_dir / "images" / "img1.png").read_bytes()
    httpserver.expect_request("/img1.png").respond_with_data(data, content_type="image/png")
    settings = ServeSettings(model_names=("tiny",), media=LOOPBACK)
    answers = []
    with running(create_app(Pipeline(reference_model, reference_tokenizer), settings)) as url:
        for image_url in (httpserver.url_for("/img1.png"), "data:image/png;base64," + base64.b64encode(data).decode()):
            request = {
                "model": "tiny",
                "max_tokens": 12,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "Describe this image."},
                            {"type": "image_url", "image_url": {"url": image_url}},
                        ],
                    }
                ],
            }
            response = httpx.post(url + "/v1/chat/completions", json=request)
            assert response.status_code == 200, response.text
            answers.append(response.json()["choices"][0]["message"]["content"])
    assert answers[0] == answers[1]
