"""Faults stay with their request: a prefill out of memory, a row whose numbers go NaN, a decode
step that fails for one row, a client that leaves mid-stream, a slow reader. Every other request
gets exactly its lone answer, and the server keeps serving.

On a GPU machine (`pytest -m gpu`) every test runs again with the model on CUDA. The faults are
injected into the real model by a wrapper that recognises the faulty requests by
their prompt: it raises CUDA's out-of-memory error in their prefill, or writes NaN into their
own slot of the KV cache (so the network itself makes that row's logits NaN at its next step).
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from cogvlm.generation import GenerationConfig
from cogvlm.pipeline import Pipeline
from cogvlm.serve import EngineSettings, ServeSettings, create_app, running
from cogvlm.serve.engine import Engine
from test_serve_engine import body, finish, run


class Faulty:
    """The model, failing on the prompts it is given (each a tuple of prompt ids):
    `oom`: its prefill raises torch.OutOfMemoryError; `nan_first`: its prefill's logits are NaN;
    `nan_later`: after its prefill, NaN is written into the values of its own slot (its prompt's
    last column, read by its next step, and the columns it has not written yet, which a slot's
    next row would read with weight 0 unless they are scrubbed; not its [BOS, image] columns,
    which nothing writes after they are computed and the engine copies to requests about the
    same image); `step_fails`: every decode call that includes its
    slot raises, until it has failed alone."""

    def __init__(self, model, oom=(), nan_first=(), nan_later=(), step_fails=()) -> None:
        self.inner = model
        self.oom, self.nan_first, self.nan_later, self.step_fails = map(set, (oom, nan_first, nan_later, step_fails))
        self.failing_slot: int | None = None  # the data pointer of a `step_fails` row's slot
        self.widest = 0  # the most rows of one decode call

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, **inputs):
        ids = inputs["input_ids"]
        if ids.shape[1] == 1:
            return self._decode(inputs)
        start = inputs.get("cache_start", 0)
        call = tuple(ids[0].tolist())

        def last_call_of(prompts) -> bool:
            """The whole prompt, or its text after an image prefix prefilled before (cache_start)."""
            return any(p[start:] == call and len(p) == start + len(call) for p in prompts)

        if last_call_of(self.oom):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (scripted)")
        out = self.inner(**inputs)
        keys, values = inputs["kv_cache"].layers[0]
        if last_call_of(self.nan_first):
            out.logits[:] = float("nan")
        if last_call_of(self.nan_later):
            values[:, :, start + ids.shape[1] - 1] = float("nan")
            values[:, :, start + ids.shape[1] + 1 :] = float("nan")
        if last_call_of(self.step_fails):
            self.failing_slot = keys.data_ptr()
        return out

    def _decode(self, inputs):
        self.widest = max(self.widest, inputs["input_ids"].shape[0])
        if self.failing_slot is not None:
            keys = inputs["kv_cache"][0].keys  # (R, Hkv, E, K) from slot 0
            slot = (self.failing_slot - keys.data_ptr()) // (keys.stride(0) * keys.element_size())
            if 0 <= slot < keys.shape[0]:
                if keys.shape[0] == 1:
                    self.failing_slot = None  # it has now failed alone: the slot goes to others
                raise RuntimeError("scripted decode failure")
        return self.inner(**inputs)


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def vlm(request, reference_dir, reference_model, reference_tokenizer):
    """The reference model on the CPU (CI) and, on a GPU machine, a copy on CUDA, where the engine
    replays decode steps as CUDA graphs."""
    if request.param == "cpu":
        return Pipeline(reference_model, reference_tokenizer)
    from cogvlm import CogVLMForCausalLM

    return Pipeline(CogVLMForCausalLM.from_pretrained(reference_dir).to("cuda"), reference_tokenizer)


@pytest.fixture(scope="module")
def images(reference_dir):
    rng = np.random.default_rng(1)
    made = [Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))]
    return [Image.open(reference_dir / "images" / f"img{i}.png").convert("RGB") for i in (0, 1)] + made


def ids(vlm, question, image=None) -> tuple[int, ...]:
    return tuple(vlm.build(question, image)["input_ids"].tolist())


def test_a_step_failing_for_one_row_ends_that_row_alone(vlm, caplog):
    """A decode step that raises is made again row by row: the row that fails alone ends with an
    internal error, the others decode on to their lone answers."""
    model = Faulty(vlm.model, step_fails=[ids(vlm, "Break the step.")])
    engine = Engine(Pipeline(model, vlm.tokenizer), EngineSettings(max_batch=4)).start()
    questions = ["What is a cat?", "Break the step.", "Describe the dog."]

    async def scenario():
        jobs = [engine.submit(vlm.build(q), GenerationConfig(max_new_tokens=12), q) for q in questions]
        return await asyncio.gather(*map(finish, jobs))

    try:
        results = run(scenario())
        again = run(_submit(engine, vlm.build("Break the step."), 5))  # its slot, its prompt: fine now
    finally:
        engine.close()
    (cat, cat_end), (broken, broken_end), (dog, dog_end) = results
    assert broken_end.kind == "error" and broken_end.error == "internal" and broken
    assert (cat, dog) == (vlm.chat(questions[0], max_new_tokens=12), vlm.chat(questions[2], max_new_tokens=12))
    assert cat_end.kind == dog_end.kind == "done"
    assert again[1].kind == "done" and again[0] == vlm.chat("Break the step.", max_new_tokens=5)
    assert "Break the step." in caplog.text  # logged with its request id


def _submit(engine, sample, n):
    async def go():
        return await finish(engine.submit(sample, GenerationConfig(max_new_tokens=n), "again"))

    return go()


# ---- 32 clients x 5 requests over HTTP --------------------------------------------------------

NORMAL = [
    ("Describe this image.", 0, 8),
    ("What color is the star?", 1, 10),
    ("What is a cat?", None, 12),
    ("Where is the dog?", 2, 6),
    ("A picture of", 0, 9),
    ("Describe the dog.", None, 7),
]
OOM, NAN_FIRST, NAN_LATER = "Run out of memory.", "Turn NaN at once.", "Turn NaN later."


async def ask(client: httpx.AsyncClient, request: dict, slow: float = 0.0, leave_after: int = 0) -> dict:
    """Status, headers, text and error of one request, plain or streamed; `slow` seconds between
    reads of the stream; `leave_after` lines, then disconnect."""
    if not request.get("stream"):
        r = await client.post("/v1/chat/completions", json=request)
        data = r.json()
        text = data["choices"][0]["message"]["content"] if r.status_code == 200 else None
        return {"status": r.status_code, "headers": r.headers, "text": text, "error": data.get("error")}
    text, error, lines = "", None, []
    async with client.stream("POST", "/v1/chat/completions", json=request) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code, "headers": r.headers, "text": None, "error": r.json()["error"]}
        async for line in r.aiter_lines():
            if not line:
                continue
            lines.append(line)
            if leave_after and len(lines) >= leave_after:
                return {"status": "left"}
            if slow:
                await asyncio.sleep(slow)
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]
                elif chunk["choices"]:
                    text += chunk["choices"][0]["delta"].get("content") or ""
    assert lines[-1] == "data: [DONE]"
    return {"status": 200, "headers": r.headers, "text": text, "error": error}


def test_32_clients_only_the_faulty_requests_fail(vlm, images):
    """32 concurrent clients x 5 requests, half streamed, with faults among them: prefills out of
    memory (503 with Retry-After), rows that turn NaN at their first token or later (500
    internal_error; streamed after text: an error event), clients that leave mid-stream, a slow
    reader. Every other answer equals its lone answer, and the server answers afterwards."""
    model = Faulty(
        vlm.model,
        oom=[ids(vlm, OOM), ids(vlm, OOM, images[0])],
        nan_first=[ids(vlm, NAN_FIRST)],
        nan_later=[ids(vlm, NAN_LATER), ids(vlm, NAN_LATER, images[1])],
    )
    lone = {(q, i, n): vlm.chat(q, None if i is None else images[i], max_new_tokens=n) for q, i, n in NORMAL}
    app = create_app(
        Pipeline(model, vlm.tokenizer),
        ServeSettings(model_names=("tiny",), engine=EngineSettings(max_batch=8, max_queue=32)),
    )
    faulty = {
        "oom": [(OOM, None), (OOM, 0)],
        "nan_first": [(NAN_FIRST, None)],
        "nan_later": [(NAN_LATER, None), (NAN_LATER, 1)],
    }
    rng = random.Random(0)
    plan = []  # in the clients' order: (client, kind, question, image, max_tokens, stream)
    for client in range(32):
        for j in range(5):
            k = client * 5 + j
            kind = {3: "oom", 7: "nan_later", 12: "nan_first"}.get(k % 16, "normal")
            kind = {21: "leave", 37: "slow"}.get(k % 40, kind)
            q, i, n = rng.choice(NORMAL)
            if kind in faulty:
                q, i = faulty[kind][k % len(faulty[kind])]
            plan.append((client, kind, q, i, 300 if kind == "leave" else n, k % 2 == 1 or kind in ("leave", "slow")))

    with running(app) as url:

        async def one_client(c):
            out = []
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                for _, kind, q, i, n, stream in (p for p in plan if p[0] == c):
                    request = body(q, None if i is None else images[i], max_tokens=n, stream=stream)
                    slow, leave = (0.03 if kind == "slow" else 0.0), (3 if kind == "leave" else 0)
                    out.append(await ask(client, request, slow, leave))
            return out

        async def everyone():
            started = time.monotonic()
            results = await asyncio.gather(*(one_client(c) for c in range(32)))
            return [r for rs in results for r in rs], time.monotonic() - started

        results, seconds = run(everyone())
        deadline = time.monotonic() + 5
        while httpx.get(url + "/health").json()["running"]:
            assert time.monotonic() < deadline, "a request that left still holds its slot"
            time.sleep(0.02)
        after = httpx.post(url + "/v1/chat/completions", json=body("What is a cat?", max_tokens=12))
    kinds = {kind: 0 for kind in ("normal", "oom", "nan_first", "nan_later", "leave", "slow")}
    for (_, kind, q, i, n, stream), result in zip(plan, results):
        kinds[kind] += 1
        if kind in ("normal", "slow"):
            assert result["status"] == 200 and result["error"] is None, (kind, q, result)
            assert result["text"] == lone[(q, i, n)], (q, i, n, stream)
        elif kind == "oom":  # before the first token: a real status, streamed or not
            assert result["status"] == 503 and result["headers"]["retry-after"] == "1", result
            assert result["error"]["code"] == "out_of_memory"
        elif kind == "nan_first":
            assert result["status"] == 500 and result["error"]["code"] == "internal_error", result
        elif kind == "nan_later":  # after its first token: a 500, or an error event in the stream
            assert result["status"] == (200 if stream else 500), result
            assert result["error"]["code"] == "internal_error"
        else:
            assert result["status"] == "left"
    assert min(kinds.values()) >= 2, kinds
    assert model.widest >= 6, "requests decoded together"
    assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == lone[NORMAL[2]]
    assert seconds < 30
