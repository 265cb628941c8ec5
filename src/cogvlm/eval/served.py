"""A served model as an `Answerer`: the same tasks scored through an OpenAI-compatible server
(`cogvlm serve`, or any server with /v1/chat/completions that takes images as data URLs).

Each question is one chat request: the query as text, the image as a `data:` URL (a file's own
bytes; a PIL image as PNG, lossless), `max_tokens` from the task, `temperature` 0 (greedy), and
CogVLM's `template_version`, an extra field `cogvlm serve` honours and other servers ignore. A
batch is sent as concurrent requests, which a continuous-batching server decodes together.
Busy (429) and loading or unavailable (502-504) answers are retried after the server's
Retry-After; any other error stops the run with the server's message.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from PIL import Image

from ..errors import CogVLMError

RETRY_STATUS = (429, 502, 503, 504)
MAX_WAIT_S = 30.0  # the longest pause between two tries
TIMEOUT_S = 600.0  # one answer; long captions on a busy server take a while


def api_root(url: str) -> str:
    """The OpenAI base URL: `http://host:port` becomes `http://host:port/v1`; a URL with a path is kept."""
    parts = urlsplit(url.rstrip("/"))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CogVLMError(f"--api-base {url!r}: give an http(s) URL such as http://127.0.0.1:8000/v1")
    return url.rstrip("/") + ("" if parts.path else "/v1")


def data_url(image: Any) -> str:
    """A `data:image/...;base64,` URL of a path, encoded bytes or a PIL image."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data, kind = buffer.getvalue(), "png"
    else:
        data = Path(image).read_bytes() if isinstance(image, (str, Path)) else bytes(image)
        try:
            with Image.open(io.BytesIO(data)) as probe:
                kind = (probe.format or "png").lower()
        except OSError:
            raise CogVLMError(f"{image if isinstance(image, (str, Path)) else 'image bytes'}: not an image") from None
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


class ServedModel:
    """`batch(requests, max_new_tokens=...)` answered by a server; `name` is the model asked for
    (default: the first the server lists at /v1/models)."""

    def __init__(self, api_base: str, model: str | None = None, api_key: str | None = None, retries: int = 8) -> None:
        try:
            import httpx
        except ModuleNotFoundError:
            raise CogVLMError("scoring a served model needs httpx: pip install 'cogvlm[serve]'") from None
        self.root, self.retries = api_root(api_base), retries
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=TIMEOUT_S)
        self.name = model or self._first_model()

    @property
    def label(self) -> str:
        """What results are filed under: the model and the server's host:port."""
        return f"{self.name} (served at {urlsplit(self.root).netloc})"

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON of a successful call; retries busy and loading answers, else one clear error."""
        import httpx

        for attempt in range(self.retries + 1):
            try:
                response = self.client.request(method, self.root + path, **kwargs)
            except httpx.HTTPError as e:
                raise CogVLMError(f"{self.root}: cannot reach the server ({type(e).__name__}: {e})") from None
            if response.status_code not in RETRY_STATUS or attempt == self.retries:
                break
            wait = response.headers.get("Retry-After", "")
            time.sleep(min(float(wait) if wait.isdigit() else 2.0**attempt, MAX_WAIT_S))
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise CogVLMError(f"{self.root}{path}: HTTP {response.status_code}: {message}")
        return response.json()

    def _first_model(self) -> str:
        models = self._call("GET", "/models").get("data") or []
        if not models:
            raise CogVLMError(f"{self.root}/models lists no model; name one with --served-model")
        return models[0]["id"]

    def ask(self, request: dict[str, Any], max_new_tokens: int) -> str:
        """One answer: query and optional image of a runner request, greedy, at most max_new_tokens."""
        content: Any = request["query"]
        if request.get("image") is not None:
            image = {"type": "image_url", "image_url": {"url": data_url(request["image"])}}
            content = [{"type": "text", "text": request["query"]}, image]
        body = {
            "model": self.name,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_new_tokens,
            "temperature": 0,
        }
        if request.get("template_version"):
            body["template_version"] = request["template_version"]
        reply = self._call("POST", "/chat/completions", json=body)
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise CogVLMError(f"{self.root}/chat/completions: a reply without choices[0].message.content") from None

    def batch(
        self, requests: Sequence[dict[str, Any]], max_new_tokens: int = 16, do_sample: bool = False, **gen: Any
    ) -> list[str]:
        """The greedy answers to `requests` (temperature 0), asked concurrently."""
        if gen or do_sample:
            raise CogVLMError(f"a served model takes only max_new_tokens here (got {', '.join(gen)})")
        with ThreadPoolExecutor(max_workers=max(1, len(requests))) as pool:
            return list(pool.map(lambda r: self.ask(r, max_new_tokens), requests))

    def close(self) -> None:
        self.client.close()
