"""Load benchmark of `cogvlm serve` on loopback: concurrent clients, mixed streaming and plain
requests with images; checks that every answer equals the answer the same request gets alone,
and measures throughput and latency with continuous batching against one request at a time.

    python benchmarks/load_test.py --model tests/fixtures/reference-tiny

Each run starts its own server process (`--max-batch N`, then `--max-batch 1`), sends every
distinct request once alone (the reference answers, and a warm-up), then lets `--clients`
clients send `--requests` requests each, back to back. Greedy decoding, so answers are exact.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import httpx
import numpy as np
from PIL import Image, ImageDraw

LAUNCH = "import sys; from cogvlm.cli import main; sys.exit(main(['serve', *sys.argv[1:]]))"
QUESTIONS = ["Describe this image.", "What color is the star?", "Where is the circle?", "How many shapes are there?"]


@dataclass(frozen=True)
class Request:
    image: int
    question: int
    max_tokens: int
    stream: bool

    @property
    def key(self) -> tuple[int, int, int]:  # what decides the answer (streaming does not)
        return self.image, self.question, self.max_tokens


def make_images(count: int) -> list[str]:
    """Data URLs of seeded random scenes, PNG and JPEG alternately, of several sizes."""
    rng = np.random.default_rng(0)
    urls = []
    for i in range(count):
        image = Image.new(
            "RGB", (int(rng.integers(48, 160)), int(rng.integers(48, 160))), tuple(rng.integers(0, 256, 3))
        )
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x0, y0 = rng.integers(0, 40, 2)
            draw.ellipse(
                (int(x0), int(y0), int(x0) + 30, int(y0) + 30), fill=tuple(int(c) for c in rng.integers(0, 256, 3))
            )
        fmt = "PNG" if i % 2 == 0 else "JPEG"
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        urls.append(f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


def plan(clients: int, requests: int, images: int, max_tokens: int) -> list[list[Request]]:
    """Each client's requests: images, questions and lengths vary; every other one streams."""
    return [
        [
            Request(
                image=(c * requests + r) % images,
                question=(c + r) % len(QUESTIONS),
                max_tokens=max_tokens - 8 * ((c + 2 * r) % 3),
                stream=(c + r) % 2 == 0,
            )
            for r in range(requests)
        ]
        for c in range(clients)
    ]


def body(request: Request, images: list[str], model: str) -> dict:
    content = [
        {"type": "text", "text": QUESTIONS[request.question]},
        {"type": "image_url", "image_url": {"url": images[request.image]}},
    ]
    return {
        "model": model,
        "max_tokens": request.max_tokens,
        "stream": request.stream,
        "messages": [{"role": "user", "content": content}],
    }


async def send(client: httpx.AsyncClient, payload: dict) -> str:
    """The answer text of one request (raises on any failure)."""
    if not payload["stream"]:
        response = await client.post("/v1/chat/completions", json=payload)
        response.raise_for_status()
        return response.json()["choices"][0]["message"]["content"]
    text, done = "", False
    async with client.stream("POST", "/v1/chat/completions", json=payload) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                text += chunk["choices"][0]["delta"].get("content") or "" if chunk["choices"] else ""
    if not done:
        raise RuntimeError("the stream ended without [DONE]")
    return text


@contextmanager
def server(model: str, max_batch: int, max_queue: int, threads: int) -> Iterator[str]:
    """A `cogvlm serve` process on a free loopback port; yields its URL once /health is 200."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                LAUNCH,
                "--model",
                model,
                "--port",
                "0",
                "--max-batch",
                str(max_batch),
                "--max-queue",
                str(max_queue),
                "--served-model-name",
                "bench",
            ],
            stderr=log,
            env=env,
        )
        try:
            deadline = time.monotonic() + 120
            url = None
            while url is None or httpx.get(url + "/health").status_code != 200:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"the server did not start:\n{log.read()}")
                time.sleep(0.1)
                log.seek(0)
                found = re.search(r"running on (http://127\.0\.0\.1:\d+)", log.read())
                url = found and found.group(1)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=60)


async def run_load(url: str, clients: list[list[Request]], images: list[str]) -> dict:
    latencies, answers, failures = [], {}, []

    async def client_loop(client: httpx.AsyncClient, requests: list[Request]) -> None:
        for request in requests:
            started = time.perf_counter()
            try:
                answer = await send(client, body(request, images, "bench"))
            except Exception as e:  # counted, and the first few shown
                failures.append(f"{request}: {type(e).__name__}: {e}")
                continue
            latencies.append(time.perf_counter() - started)
            answers.setdefault(request.key, []).append(answer)

    limits = httpx.Limits(max_connections=len(clients) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client, requests) for requests in clients))
        wall = time.perf_counter() - started
    return {"latencies": latencies, "answers": answers, "failures": failures, "wall": wall}


async def lone_answers(url: str, requests: set[Request], images: list[str]) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        return {r.key: await send(client, body(r, images, "bench")) for r in sorted(requests, key=lambda r: r.key)}


def measure(model: str, max_batch: int, threads: int, clients: list[list[Request]], images: list[str]) -> dict:
    distinct = {Request(r.image, r.question, r.max_tokens, False) for requests in clients for r in requests}
    with server(model, max_batch, len(clients) * 2, threads) as url:
        lone = asyncio.run(lone_answers(url, distinct, images))
        result = asyncio.run(run_load(url, clients, images))
    result["mismatches"] = sum(a != lone[key] for key, got in result["answers"].items() for a in got)
    result["lone"] = lone
    result["tokens"] = sum(r.max_tokens for requests in clients for r in requests)  # tiny models never stop early
    return result


def report(name: str, result: dict, total: int) -> str:
    lat = sorted(result["latencies"]) or [float("nan")]
    p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))]
    return (
        f"| {name} | {total} | {len(result['failures'])} | {result['mismatches']} | {result['wall']:.2f} | "
        f"{total / result['wall']:.2f} | {result['tokens'] / result['wall']:.0f} | "
        f"{statistics.median(lat):.3f} | {p95:.3f} |"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=5, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=48, help="longest answer; others are 8 and 16 shorter")
    p.add_argument("--max-batch", type=int, default=8, help="the batched server's --max-batch")
    p.add_argument("--images", type=int, default=8, help="distinct images")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="the servers' torch threads (OMP_NUM_THREADS); 1 suits tiny models on shared cores",
    )
    args = p.parse_args(argv)
    images = make_images(args.images)
    clients = plan(args.clients, args.requests, args.images, args.max_tokens)
    total = args.clients * args.requests
    batched = measure(args.model, args.max_batch, args.threads, clients, images)
    single = measure(args.model, 1, args.threads, clients, images)
    print(
        f"{args.clients} clients x {args.requests} requests, half streaming, {args.images} images, "
        f"answers of {args.max_tokens - 16}-{args.max_tokens} tokens, model {args.model}, "
        f"{args.threads} torch thread(s)\n"
    )
    print("| server | requests | failures | answers != lone | wall s | requests/s | tokens/s | p50 s | p95 s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(report(f"--max-batch {args.max_batch}", batched, total))
    print(report("--max-batch 1", single, total))
    speedup = (total / batched["wall"]) / (total / single["wall"])
    same = batched["lone"] == single["lone"]
    print(f"\nspeedup of batching: {speedup:.2f}x; lone answers equal across both servers: {same}")
    for failure in (batched["failures"] + single["failures"])[:5]:
        print("failure:", failure)
    ok = not (batched["failures"] or single["failures"] or batched["mismatches"] or single["mismatches"]) and same
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
