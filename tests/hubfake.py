"""A fake Hugging Face hub on 127.0.0.1, and checkpoints laid out the way they are published.

The server answers what huggingface_hub's `model_info`, `snapshot_download` and `hf_hub_download` ask:
the model-info API (sha + siblings), the tree API, HEAD/GET `/{repo}/resolve/{revision}/{file}` with
X-Repo-Commit, ETag and Content-Length, Range requests (206), the hub's error codes (X-Error-Code
RepoNotFound / RevisionNotFound / EntryNotFound, 401 GatedRepo), and 307 redirects from a renamed
organisation's names (`renamed`). It never advertises Xet (no X-Xet-* headers, no xetHash in
listings), so downloads take huggingface_hub's plain HTTP path even with hf_xet installed. Files are
served straight (no CDN redirect). Every request is logged; `cut` drops a file's body mid-way.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from huggingface_hub import constants
from safetensors.torch import load_file

from cogvlm.loading.files import save_state_dict, weight_files

REMOTE_CODE = ("configuration_cogvlm.py", "modeling_cogvlm.py", "visual.py", "util.py")
TINY_SHAPES = Path(__file__).resolve().parents[1] / "src" / "cogvlm" / "assets" / "tiny-shapes"
COGVLM_REPO = "THUDM/cogvlm-chat-hf"
VICUNA_REPO = "lmsys/vicuna-7b-v1.5"
VICUNA_BIN = "pytorch_model-00001-of-00002.bin"


@dataclass
class Request:
    method: str
    path: str  # unquoted, without the query
    range: str | None
    status: int


@dataclass
class Repo:
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> {path: content}
    gated: bool = False


class FakeHub:
    """Repos in memory, served by `serve()`; `log` holds every request answered."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.log: list[Request] = []
        self.cuts: dict[tuple[str, str], list[int]] = {}  # see `cut`
        self.renamed: dict[str, str] = {}  # old owner -> new owner: the old name's URLs redirect (307)

    def publish(self, repo_id: str, files: Path | dict[str, bytes], revision: str = "main", gated: bool = False) -> str:
        """Make `files` (a folder or {path: bytes}) the content of `repo_id` at branch `revision`; the commit."""
        if isinstance(files, Path):
            files = {p.relative_to(files).as_posix(): p.read_bytes() for p in sorted(files.rglob("*")) if p.is_file()}
        digest = hashlib.sha1(repo_id.encode() + revision.encode())
        for name in sorted(files):
            digest.update(name.encode() + hashlib.sha256(files[name]).digest())
        commit = digest.hexdigest()
        repo = self.repos.setdefault(repo_id, Repo())
        repo.refs[revision], repo.commits[commit], repo.gated = commit, dict(files), gated
        return commit

    def cut(self, repo_id: str, filename: str, *afters: int) -> None:
        """The next GETs of the file send `afters[i]` bytes of their body each, then drop the connection."""
        self.cuts[(repo_id, filename)] = list(afters)

    def requested(self, method: str = "GET") -> list[str]:
        """File names asked for with `method` on /resolve, in order (answered or not)."""
        matches = [re.fullmatch(r"/[^/]+/[^/]+/resolve/[^/]+/(.+)", r.path) for r in self.log if r.method == method]
        return [m.group(1) for m in matches if m]

    @contextmanager
    def serve(self) -> Iterator[str]:
        """Run the server in a thread for the block; yields its endpoint URL."""
        server = _Server(("127.0.0.1", 0), _handler(self))
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()
            thread.join()

    def _take_cut(self, repo_id: str, filename: str) -> int | None:
        afters = self.cuts.get((repo_id, filename))
        return afters.pop(0) if afters else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # huggingface_hub opens 8 at once; a full backlog costs a 1 s SYN retry


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # quiet test output
            pass

        def do_HEAD(self) -> None:
            self._route(body=False)

        def do_GET(self) -> None:
            self._route(body=True)

        def _route(self, body: bool) -> None:
            raw = urlsplit(self.path).path  # a revision's "/" comes quoted: match first, then unquote
            path = unquote(raw)
            self._body = body
            api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+))?(?:/.*)?", raw)
            resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", raw)
            match = api or resolve
            if match is None:
                self._error(path, 404, "RepoNotFound", "not a hub route")
            elif self._redirected(path, unquote(match.group(1))):
                pass
            elif api:
                self._api(path, unquote(api.group(1)), api.group(2), unquote(api.group(3) or "main"))
            else:
                self._resolve(path, *map(unquote, match.groups()))

        def _redirected(self, path: str, repo_id: str) -> bool:
            """A renamed owner's repo: 307 to the same URL under the new owner (as the hub answers)."""
            owner = repo_id.split("/")[0]
            if owner not in hub.renamed or repo_id in hub.repos:
                return False
            self._send(path, 307, b"", {"Location": self.path.replace(f"/{owner}/", f"/{hub.renamed[owner]}/", 1)})
            return True

        def _commit(self, path: str, repo_id: str, revision: str) -> tuple[Repo, str] | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(path, 404, "RepoNotFound", "Repository not found")
                return None
            commit = repo.refs.get(revision, revision)
            if commit not in repo.commits:
                self._error(path, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return None
            return repo, commit

        def _api(self, path: str, repo_id: str, kind: str | None, revision: str) -> None:
            found = self._commit(path, repo_id, revision)
            if found is None:
                return
            repo, commit = found
            files = repo.commits[commit]
            if kind == "tree":
                data: object = [_tree_entry(name, content) for name, content in sorted(files.items())]
            else:
                data = {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": commit,
                    "private": False,
                    "gated": "manual" if repo.gated else False,
                    "disabled": False,
                    "tags": [],
                    "siblings": [{"rfilename": name} for name in sorted(files)],
                }
            self._send(path, 200, json.dumps(data).encode(), {"Content-Type": "application/json"})

        def _resolve(self, path: str, repo_id: str, revision: str, filename: str) -> None:
            found = self._commit(path, repo_id, revision)
            if found is None:
                return
            repo, commit = found
            if repo.gated:
                self._error(path, 401, "GatedRepo", f"Access to model {repo_id} is restricted. Please log in.")
                return
            content = repo.commits[commit].get(filename)
            if content is None:
                self._error(path, 404, "EntryNotFound", f"{filename} does not exist", {"X-Repo-Commit": commit})
                return
            headers = {
                "X-Repo-Commit": commit,
                "ETag": f'"{hashlib.sha256(content).hexdigest()}"',
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            status = 200
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
            if m:
                start, end = int(m.group(1)), int(m.group(2) or len(content) - 1)
                headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
                status, content = 206, content[start : end + 1]
            cut = hub._take_cut(repo_id, filename) if self._body else None
            self._send(path, status, content, headers, cut)

        def _error(
            self, path: str, status: int, code: str, message: str, headers: dict[str, str] | None = None
        ) -> None:
            body = json.dumps({"error": message}).encode()
            self._send(
                path,
                status,
                body,
                {
                    "X-Error-Code": code,
                    "X-Error-Message": message,
                    "Content-Type": "application/json",
                    **(headers or {}),
                },
            )

        def _send(self, path: str, status: int, body: bytes, headers: dict[str, str], cut: int | None = None) -> None:
            hub.log.append(Request(self.command, path, self.headers.get("Range"), status))
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            if self._body:
                self.wfile.write(body if cut is None else body[:cut])
            if cut is not None:  # the client sees the connection end before Content-Length bytes
                self.close_connection = True

    return Handler


def _tree_entry(name: str, content: bytes) -> dict[str, object]:
    entry: dict[str, object] = {
        "type": "file",
        "path": name,
        "size": len(content),
        "oid": hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest(),
    }
    if name.endswith((".safetensors", ".bin")):
        entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}
    return entry


def point_hub(mp: pytest.MonkeyPatch, endpoint: str, cache: Path, offline: bool = False) -> None:
    """Make huggingface_hub (in this process, and subprocesses through the env) use `endpoint` and `cache`.

    huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE, HF_HUB_OFFLINE, the token path and the telemetry
    switch into `huggingface_hub.constants` when it is first imported, so changing the env vars later
    does nothing in this process: the constants are patched too (the URL template is built from the
    endpoint at import as well). No login token is sent: HF_TOKEN is unset and the token file points nowhere.
    """
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_TOKEN_PATH": str(cache / "no-token"),
    }
    for name, value in env.items():
        mp.setenv(name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        mp.delenv(name, raising=False)
    mp.setattr(constants, "ENDPOINT", endpoint)
    mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    mp.setattr(constants, "HF_HUB_CACHE", str(cache))
    mp.setattr(constants, "HF_HUB_OFFLINE", offline)
    mp.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    mp.setattr(constants, "HF_TOKEN_PATH", env["HF_TOKEN_PATH"])


def closed_endpoint() -> str:
    """An http URL on 127.0.0.1 where nothing listens (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def publish_cogvlm(src_folder: Path, repo_files_dir: Path, shards: int = 8) -> Path:
    """Lay out a model folder as the official CogVLM repos are published: `shards` safetensors shards +
    index, config.json, generation_config.json, the remote-code .py files, a README, and no tokenizer."""
    state = {}
    for path in weight_files(src_folder):
        state.update(load_file(path))
    repo_files_dir.mkdir(parents=True, exist_ok=True)
    sizes = [t.numel() * t.element_size() for t in state.values()]
    save_state_dict(state, repo_files_dir, max_shard_size=_shard_limit(sizes, shards))
    for name in ("config.json", "generation_config.json"):
        shutil.copyfile(src_folder / name, repo_files_dir / name)
    for name in REMOTE_CODE:  # copied along with the checkpoint, never executed
        (repo_files_dir / name).write_text(f"# placeholder for the official {name}\n")
    (repo_files_dir / "README.md").write_text("# CogVLM\n\nA model card (never fetched for loading).\n")
    return repo_files_dir


def _shard_limit(sizes: list[int], shards: int) -> int:
    """The smallest max_shard_size for which save_state_dict's greedy packing makes `shards` shards."""
    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _count_shards(sizes, mid) <= shards else (mid + 1, hi)
    assert _count_shards(sizes, lo) == shards, f"no shard size gives exactly {shards} shards"
    return lo


def _count_shards(sizes: list[int], limit: int) -> int:
    count, size, items = 1, 0, 0
    for nbytes in sizes:  # as save_state_dict packs them
        if items and size + nbytes > limit:
            count, size, items = count + 1, 0, 0
        size, items = size + nbytes, items + 1
    return count


def publish_vicuna_tokenizer(src_tokenizer_folder: Path, repo_files_dir: Path) -> Path:
    """Lay out a Vicuna-like repo: tokenizer files, config, generation config, a README and a big
    weight shard (which fetching the tokenizer must leave alone)."""
    repo_files_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(src_tokenizer_folder / name, repo_files_dir / name)
    (repo_files_dir / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000})
    )
    (repo_files_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (repo_files_dir / VICUNA_BIN).write_bytes(bytes(8 << 20))
    (repo_files_dir / "README.md").write_text("# Vicuna\n")
    return repo_files_dir


def publish_all(root: Path) -> dict[str, Path]:
    """THUDM/cogvlm-chat-hf (the shipped tiny-shapes model, as published) and lmsys/vicuna-7b-v1.5
    (tiny-shapes' tokenizer), laid out under `root`: {repo id: folder}."""
    return {
        COGVLM_REPO: publish_cogvlm(TINY_SHAPES, root / "cogvlm"),
        VICUNA_REPO: publish_vicuna_tokenizer(TINY_SHAPES, root / "vicuna"),
    }


def hub_with(repos: dict[str, Path]) -> FakeHub:
    """A fake hub serving each folder of {repo id: folder} as its repo's main branch."""
    hub = FakeHub()
    for repo_id, folder in repos.items():
        hub.publish(repo_id, folder)
    return hub


def build_hub_cache(root: Path) -> Path:
    """`root`/cache: an HF_HUB_CACHE filled by downloading the repos of `publish_all` from a fake hub
    as the package does (resolve_model, then resolve_tokenizer's Vicuna fallback)."""
    from cogvlm.loading.resolve import resolve_model, resolve_tokenizer

    cache = root / "cache"
    with hub_with(publish_all(root / "repos")).serve() as endpoint, pytest.MonkeyPatch.context() as mp:
        point_hub(mp, endpoint, cache)
        resolve_tokenizer(None, resolve_model(COGVLM_REPO))
    return cache
