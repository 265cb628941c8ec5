"""Grounding boxes: returned structured next to the answer (openai client, plain and streamed),
and drawn over the image by the web page in a real headless Chromium.

The tiny random model writes no boxes, so the engine's token picker is scripted to pick the
tokens of a grounding answer: the model, engine, streaming decoder, server and page run for real."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import openai
import pytest

import cogvlm.serve.engine
from cogvlm.pipeline import Pipeline
from cogvlm.serve import ServeSettings, create_app, running

ANSWER = "A red star [[100,200,400,600]] and a cat [[500,500,900,950]]."
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


def scripted_picker(script: list[int], eos: int):
    """The engine's token picker, scripted: each row continues `script` after the longest script
    prefix that ends its tokens so far (the prompt ends with none of it), then eos."""

    def pick(engine, logits, jobs):
        picked = []
        for job in jobs:
            tokens = job.sample["input_ids"].tolist() + job.tokens
            done = max(k for k in range(len(script) + 1) if k == 0 or tokens[-k:] == script[:k])
            picked.append(script[done] if done < len(script) else eos)
        return picked

    return pick


@pytest.fixture(scope="module")
def script(reference_tokenizer) -> list[int]:
    ids = reference_tokenizer.encode(ANSWER)
    assert reference_tokenizer.decode(ids) == ANSWER
    return ids


@pytest.fixture(scope="module")
def url(reference_model, reference_tokenizer, script):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cogvlm.serve.engine.Engine, "_pick", scripted_picker(script, reference_tokenizer.eos_token_id))
        vlm = Pipeline(reference_model, reference_tokenizer)
        with running(create_app(vlm, ServeSettings(model_names=("tiny",)))) as base:
            yield base


@pytest.fixture(scope="module")
def image_path(reference_dir) -> Path:
    return reference_dir / "images" / "img0.png"  # 64 x 48


def ask(client: openai.OpenAI, image_path: Path, **options):
    url = "data:image/png;base64," + base64.b64encode(image_path.read_bytes()).decode()
    return client.chat.completions.create(
        model="tiny",
        max_tokens=64,
        **options,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Where are the star and the cat?"},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ],
    )


EXPECTED = [
    {"label": "A red star", "box": [0.1, 0.2, 0.4, 0.6], "pixels": [6, 9, 25, 28]},
    {"label": "and a cat", "box": [0.5, 0.5, 0.9, 0.95], "pixels": [32, 24, 57, 45]},
]


def test_boxes_next_to_the_answer(url, image_path):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    message = ask(client, image_path).choices[0].message
    assert message.content == ANSWER
    assert message.model_extra["boxes"] == EXPECTED
    chunks = list(ask(client, image_path, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ANSWER
    assert chunks[-1].choices[0].finish_reason and chunks[-1].choices[0].delta.model_extra["boxes"] == EXPECTED
    assert all("boxes" not in (c.choices[0].delta.model_extra or {}) for c in chunks[:-1])


def test_no_boxes_field_without_boxes(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="tiny", max_tokens=3, messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content == "A red star" and not reply.choices[0].message.model_extra


def drop_file(page, path: Path) -> None:
    """Drop a file on the drop zone, as a person dragging it from their desktop would."""
    transfer = page.evaluate_handle(
        """([name, b64]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: "image/png"}));
        return transfer;
    }""",
        [path.name, base64.b64encode(path.read_bytes()).decode()],
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})


def test_the_page_streams_the_answer_and_draws_the_boxes(url, image_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM):
        pytest.skip(f"no {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.set_default_timeout(15_000)
            sync_api.expect.set_options(timeout=15_000)
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            sync_api.expect(page.locator("#model")).to_have_text("model: tiny")
            page.set_input_files("#file", str(image_path))
            sync_api.expect(page.locator("#stage")).to_be_visible()
            page.fill("#question", "Where are the star and the cat?")
            page.click("#settings summary")
            page.fill("#max-tokens", "64")
            page.click("#send")
            answer = page.locator(".turn.assistant:not(.streaming)")
            sync_api.expect(answer).to_have_text(ANSWER)
            boxes = page.locator("#boxes .box")
            sync_api.expect(boxes).to_have_count(2)
            picture = page.locator("#picture").bounding_box()
            star = boxes.nth(0).bounding_box()
            assert abs(star["x"] - (picture["x"] + 0.1 * picture["width"])) < 3
            assert abs(star["width"] - 0.3 * picture["width"]) < 4
            assert abs(star["height"] - 0.4 * picture["height"]) < 4
            sync_api.expect(boxes.nth(1)).to_contain_text("and a cat")
            page.fill("#question", "And now?")  # a second turn sends the history
            page.keyboard.press("Enter")
            sync_api.expect(page.locator(".turn.assistant:not(.streaming)")).to_have_count(2)
            page.click("#clear")
            sync_api.expect(page.locator("#log .turn")).to_have_count(0)
            sync_api.expect(boxes).to_have_count(0)
            shown = page.locator("#picture").get_attribute("src")
            drop_file(page, image_path.parent / "img1.png")  # dropping an image replaces it
            sync_api.expect(page.locator("#picture")).not_to_have_attribute("src", shown)
            assert not errors
        finally:
            browser.close()
