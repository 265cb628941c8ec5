"""`cogvlm eval --api-base URL`: the same tasks scored through an OpenAI-compatible server.

Against a live `cogvlm serve` (a subprocess on 127.0.0.1 serving the shipped model) the shapes
scores and every answer equal those of the model loaded from its folder (greedy decoding). Against
a scripted server: what is sent, retries while the server loads, and its errors."""

from __future__ import annotations

import base64
import io
import json
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image
from werkzeug import Response

from cogvlm.cli import main
from cogvlm.errors import CogVLMError
from cogvlm.eval import served as served_module
from cogvlm.eval.served import ServedModel, api_root, data_url

LAUNCH = "import sys; from cogvlm.cli import main; sys.exit(main(['serve', *sys.argv[1:]]))"
SHAPES = "shapes-seed999999-n2"


@pytest.fixture
def served_default_model():
    """`cogvlm serve` of the shipped model on a free port of 127.0.0.1, with an API key; its URL."""
    argv = ["--port", "0", "--api-key", "k", "--device", "cpu", "--max-batch", "8"]
    process = subprocess.Popen([sys.executable, "-c", LAUNCH, *argv], stderr=subprocess.PIPE, text=True)
    try:
        url = None
        while url is None:
            line = process.stderr.readline()
            assert line, "the server exited before listening"
            found = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
            url = found and found.group(1)
        deadline = time.monotonic() + 60
        while httpx.get(url + "/health").status_code != 200:  # the model loads in the background
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.05)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0


def _results(out) -> tuple[dict, list[dict]]:
    result = json.loads((out / f"{SHAPES}.results.json").read_text())
    rows = [json.loads(line) for line in (out / f"{SHAPES}.predictions.jsonl").read_text().splitlines()[1:]]
    return result, rows


def test_a_served_model_scores_exactly_as_its_folder(served_default_model, tmp_path, capsys, one_thread):
    served = ["eval", "shapes", "--n", "2", "--api-base", served_default_model, "--api-key", "k"]
    assert main([*served, "--out", str(tmp_path / "served")]) == 0
    served_table = capsys.readouterr().out.splitlines()[:11]
    assert main(["eval", "shapes", "--n", "2", "--device", "cpu", "--out", str(tmp_path / "folder")]) == 0
    assert capsys.readouterr().out.splitlines()[:11] == served_table
    (served_result, served_rows), (folder_result, folder_rows) = map(
        _results, (tmp_path / "served", tmp_path / "folder")
    )
    assert served_rows == folder_rows  # every answer, raw and cleaned
    for key in ("scores", "per_type", "counts"):
        assert served_result[key] == folder_result[key]
    assert 0 < folder_result["scores"]["accuracy"] < 1  # some right, some wrong: the equality means something
    port = served_default_model.rsplit(":", 1)[1]
    assert served_result["model"] == f"tiny-shapes (served at 127.0.0.1:{port})"  # the server's first model


# ----------------------------------------------------------------------------- a scripted server
PNG = io.BytesIO()
Image.new("RGB", (4, 3), (255, 0, 0)).save(PNG, format="PNG")


def _reply(text: str) -> dict:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


def test_what_a_request_sends(httpserver, tmp_path):
    jpeg = tmp_path / "cat.jpg"
    Image.new("RGB", (5, 5)).save(jpeg)
    httpserver.expect_request("/v1/models").respond_with_json({"data": [{"id": "m1"}, {"id": "m2"}]})
    seen = []

    def answer(request):
        seen.append((request.headers.get("Authorization"), request.get_json()))
        return Response(json.dumps(_reply("red")), content_type="application/json")

    httpserver.expect_request("/v1/chat/completions", method="POST").respond_with_handler(answer)
    model = ServedModel(httpserver.url_for("/"), api_key="secret")
    assert model.name == "m1"
    image = Image.open(io.BytesIO(PNG.getvalue()))
    requests = [
        {"query": "What color?", "image": image, "template_version": "vqa"},
        {"query": "And this?", "image": jpeg, "template_version": None},
    ]
    assert model.batch(requests, max_new_tokens=7) == ["red", "red"]
    bodies = sorted((body for _, body in seen), key=lambda b: b["messages"][0]["content"][0]["text"])
    assert {auth for auth, _ in seen} == {"Bearer secret"}
    first = bodies[1]  # "What color?"
    assert first["model"] == "m1" and first["max_tokens"] == 7 and first["temperature"] == 0
    assert first["template_version"] == "vqa" and "template_version" not in bodies[0]
    text, picture = first["messages"][0]["content"]
    assert text == {"type": "text", "text": "What color?"}
    url = picture["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).tobytes() == image.tobytes()  # lossless
    assert bodies[0]["messages"][0]["content"][1]["image_url"]["url"] == data_url(jpeg)
    assert data_url(jpeg).startswith("data:image/jpeg;base64,")  # a file's own bytes, its own type


def test_busy_and_loading_answers_are_retried(httpserver):
    busy = {"error": {"message": "the model is still loading"}}
    httpserver.expect_ordered_request("/v1/chat/completions").respond_with_json(busy, 503, {"Retry-After": "0"})
    httpserver.expect_ordered_request("/v1/chat/completions").respond_with_json(busy, 429, {"Retry-After": "0"})
    httpserver.expect_ordered_request("/v1/chat/completions").respond_with_json(_reply("yes"))
    model = ServedModel(httpserver.url_for("/v1"), model="m")
    assert model.batch([{"query": "Is it?", "image": None}]) == ["yes"]
    assert len(httpserver.log) == 3


def test_errors_carry_the_servers_message(httpserver):
    denied = {"error": {"message": "invalid API key", "type": "invalid_request_error"}}
    httpserver.expect_request("/v1/models").respond_with_json(denied, 401)
    with pytest.raises(CogVLMError, match=r"/v1/models: HTTP 401: invalid API key"):
        ServedModel(httpserver.url_for("/"))
    with pytest.raises(CogVLMError, match="cannot reach the server"):
        ServedModel("http://127.0.0.1:9", model="m").batch([{"query": "q", "image": None}])


def test_api_root():
    assert api_root("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert api_root("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000/v1"
    assert api_root("https://host/openai/v1") == "https://host/openai/v1"
    with pytest.raises(CogVLMError, match="give an http"):
        api_root("127.0.0.1:8000")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--api-base", "http://h", "--model", "m"], "--api-base scores a served model: drop --model"),
        (["--served-model", "x"], "--served-model only apply with --api-base URL"),
        (["--api-key", "k"], "--api-key only apply with --api-base URL"),
    ],
)
def test_cli_served_flag_errors(argv, message, capsys):
    assert main(["eval", "shapes", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_a_long_retry_after_is_capped(httpserver, monkeypatch):
    monkeypatch.setattr(served_module, "MAX_WAIT_S", 0.05)
    httpserver.expect_ordered_request("/v1/models").respond_with_json({}, 503, {"Retry-After": "100"})
    httpserver.expect_ordered_request("/v1/models").respond_with_json({"data": [{"id": "m"}]})
    start = time.monotonic()
    assert ServedModel(httpserver.url_for("/")).name == "m"
    assert time.monotonic() - start < 5
