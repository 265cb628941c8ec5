"""Hub ids into local folders (cogvlm.loading.resolve), against a fake hub on 127.0.0.1 (tests/hubfake.py).

Every test points huggingface_hub at the fake server or at a closed local port: nothing reaches the network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import constants, file_download

from cogvlm.errors import CheckpointError
from cogvlm.loading.files import SAFE_INDEX, weight_files
from cogvlm.loading.resolve import (
    VICUNA_TOKENIZER,
    is_hub_id,
    resolve_config_file,
    resolve_model,
    resolve_tokenizer,
)
from hubfake import (
    COGVLM_REPO,
    REMOTE_CODE,
    TINY_SHAPES,
    VICUNA_BIN,
    VICUNA_REPO,
    FakeHub,
    closed_endpoint,
    hub_with,
    point_hub,
    publish_all,
)

SHARD3 = "model-00003-of-00008.safetensors"
SMALL = {"config.json": b'{"hidden_size": 8}', "model.safetensors": b"weights", "README.md": b"# small"}


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, Path]:
    return publish_all(tmp_path_factory.mktemp("repos"))


@pytest.fixture
def hub(repos) -> FakeHub:
    return hub_with(repos)


@pytest.fixture
def cache(hub, tmp_path, monkeypatch) -> Iterator[Path]:
    """An empty hub cache, with huggingface_hub pointed at the running fake hub (online)."""
    with hub.serve() as endpoint:
        point_hub(monkeypatch, endpoint, tmp_path / "cache")
        yield tmp_path / "cache"


@pytest.fixture
def offline_hub_cache(hub_cache, monkeypatch) -> Path:
    """The session's hub cache with HF_HUB_OFFLINE set, and nothing listening at HF_ENDPOINT."""
    point_hub(monkeypatch, closed_endpoint(), hub_cache, offline=True)
    return hub_cache


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def snapshot(cache: Path, repo_id: str, revision: str = "main") -> Path:
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    return storage / "snapshots" / (storage / "refs" / revision).read_text()


# ---- (a) downloading fetches exactly what loading needs -------------------------------------------------


def test_model_download_fetches_only_what_loading_needs(hub, cache, repos):
    folder = resolve_model(COGVLM_REPO)

    shards = sorted(json.loads((repos[COGVLM_REPO] / SAFE_INDEX).read_text())["weight_map"].values())
    needed = {SAFE_INDEX, "config.json", "generation_config.json", *REMOTE_CODE, *shards}
    assert len(set(shards)) == 8
    assert sorted(hub.requested("GET")) == sorted(needed)  # each once; never README.md
    assert "README.md" not in hub.requested("HEAD")
    # the standard cache layout: snapshots/<commit>/<file> -> ../../blobs/<etag>, refs/main -> commit
    assert folder == snapshot(cache, COGVLM_REPO)
    assert {p.name for p in folder.iterdir()} == needed
    for path in folder.iterdir():
        assert path.is_symlink() and path.resolve().parent == cache / "models--THUDM--cogvlm-chat-hf" / "blobs"
        assert path.read_bytes() == (repos[COGVLM_REPO] / path.name).read_bytes()
    assert len(weight_files(folder)) == 8

    gets = len(hub.requested("GET"))
    assert resolve_model(COGVLM_REPO) == folder
    assert len(hub.requested("GET")) == gets  # the second time everything comes from the cache


def test_tokenizer_download_fetches_tokenizer_files_only(hub, cache, tmp_path):
    folder = resolve_tokenizer(VICUNA_REPO, tmp_path)

    assert folder == snapshot(cache, VICUNA_REPO)
    wanted = ["special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]
    assert sorted(hub.requested("GET")) == wanted
    assert sorted(hub.requested("HEAD")) == wanted  # the big .bin, config.json, README.md: not even asked about
    assert sorted(p.name for p in folder.iterdir()) == wanted


def test_config_file_alone(hub, cache):
    path = resolve_config_file(COGVLM_REPO)
    assert path.name == "config.json" and path.parent == snapshot(cache, COGVLM_REPO)
    assert hub.requested("GET") == ["config.json"]
    assert resolve_config_file(TINY_SHAPES) == TINY_SHAPES / "config.json"


# ---- (b) an interrupted download ------------------------------------------------------------------------


@pytest.fixture
def small_chunks(monkeypatch) -> int:
    """huggingface_hub writes a download in DOWNLOAD_CHUNK_SIZE pieces (10 MB) and resumes after the last
    whole piece written; the shards here are ~3 MB, so use 64 KiB pieces. It waits 1 s before resuming: skip."""
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 << 10)
    monkeypatch.setattr(file_download, "time", SimpleNamespace(sleep=lambda seconds: None))
    return 64 << 10


def shard_gets(hub: FakeHub) -> list[tuple[str | None, int]]:
    return [(r.range, r.status) for r in hub.log if r.method == "GET" and r.path.endswith("/" + SHARD3)]


def test_interrupted_download_resumes_with_a_range_request_in_the_same_call(hub, cache, repos, small_chunks):
    hub.cut(COGVLM_REPO, SHARD3, 1_000_000)  # the first GET's body stops after 1 MB, connection dropped

    folder = resolve_model(COGVLM_REPO)

    resumed_at = 1_000_000 // small_chunks * small_chunks
    assert shard_gets(hub) == [(None, 200), (f"bytes={resumed_at}-", 206)]
    assert (folder / SHARD3).read_bytes() == (repos[COGVLM_REPO] / SHARD3).read_bytes()


def test_failed_download_keeps_no_partial_file_and_the_next_call_starts_over(hub, cache, repos, small_chunks):
    # 1 MB, then five resumes that bring nothing: huggingface_hub gives up (5 retries without progress)
    hub.cut(COGVLM_REPO, SHARD3, 1_000_000, 0, 0, 0, 0, 0)

    message = one_line_error(resolve_model, COGVLM_REPO)
    assert "cannot reach the Hugging Face hub" in message and "HF_HUB_OFFLINE=1" in message
    assert not list(cache.rglob("*.incomplete"))  # the partial file is deleted, not kept for later
    assert not (snapshot(cache, COGVLM_REPO) / SHARD3).exists()
    assert len(shard_gets(hub)) == 6

    folder = resolve_model(COGVLM_REPO)

    assert shard_gets(hub)[6:] == [(None, 200)]  # from byte 0: huggingface_hub resumes within a call only
    assert (folder / SHARD3).read_bytes() == (repos[COGVLM_REPO] / SHARD3).read_bytes()


# ---- (c) offline ----------------------------------------------------------------------------------------


def test_offline_resolves_from_the_cache(offline_hub_cache):
    folder = resolve_model(COGVLM_REPO)
    assert folder == snapshot(offline_hub_cache, COGVLM_REPO)
    assert len(weight_files(folder)) == 8
    assert resolve_tokenizer(None, folder) == snapshot(offline_hub_cache, VICUNA_REPO)


def test_local_files_only_uses_the_cache_without_the_network(hub_cache, monkeypatch):
    point_hub(monkeypatch, closed_endpoint(), hub_cache)
    assert resolve_model(COGVLM_REPO, local_files_only=True) == snapshot(hub_cache, COGVLM_REPO)


def test_offline_in_a_fresh_process(hub_cache, tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(hub_cache),
        "HF_ENDPOINT": closed_endpoint(),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    code = (
        "from cogvlm.loading.resolve import resolve_model, resolve_tokenizer\n"
        "m = resolve_model('THUDM/cogvlm-chat-hf'); print(m); print(resolve_tokenizer(None, m))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(snapshot(hub_cache, COGVLM_REPO)), str(snapshot(hub_cache, VICUNA_REPO))]


def test_offline_and_not_cached(monkeypatch, tmp_path):
    point_hub(monkeypatch, closed_endpoint(), tmp_path / "cache", offline=True)
    message = one_line_error(resolve_model, COGVLM_REPO)
    assert message == (
        f"{COGVLM_REPO} is not in the local hub cache (HF_HUB_OFFLINE is set): run once with network, or pass a folder"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert "(local_files_only is set)" in one_line_error(resolve_model, COGVLM_REPO, local_files_only=True)


# ---- (d) revisions --------------------------------------------------------------------------------------


def test_revision_branch_resolves_to_its_own_content(hub, cache, monkeypatch):
    main = hub.publish("org/small", SMALL)
    hub.publish("org/small", {**SMALL, "config.json": b'{"hidden_size": 16}'}, revision="dev")

    dev_folder = resolve_model("org/small", revision="dev")
    main_folder = resolve_model("org/small")

    assert dev_folder != main_folder and main_folder.name == main
    assert (dev_folder / "config.json").read_bytes() == b'{"hidden_size": 16}'
    assert (main_folder / "config.json").read_bytes() == b'{"hidden_size": 8}'
    assert resolve_model("org/small", revision=main) == main_folder  # a commit works as a revision too
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_model("org/small", revision="dev") == dev_folder  # and the branch resolves offline


def test_unknown_revision(hub, cache):
    hub.publish("org/small", SMALL)
    message = one_line_error(resolve_model, "org/small", revision="v9")
    assert "no revision 'v9'" in message


# ---- (e) THUDM <-> zai-org ------------------------------------------------------------------------------


def test_thudm_repo_found_under_zai_org_offline(offline_hub_cache):
    assert resolve_model("zai-org/cogvlm-chat-hf") == resolve_model(COGVLM_REPO)


def test_renamed_org_online_then_offline_under_either_name(hub, cache, monkeypatch):
    hub.publish("zai-org/cogvlm-base-490-hf", SMALL)
    hub.renamed["THUDM"] = "zai-org"  # the hub redirects the old name's URLs

    folder = resolve_model("THUDM/cogvlm-base-490-hf")

    assert folder == snapshot(cache, "THUDM/cogvlm-base-490-hf")  # cached under the name used
    assert {(r.path.removeprefix("/api/models").split("/")[1], r.status) for r in hub.log} == {
        ("THUDM", 307),
        ("zai-org", 200),
    }
    assert sorted(hub.requested("GET")) == ["config.json", "model.safetensors"]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_model("zai-org/cogvlm-base-490-hf") == resolve_model("THUDM/cogvlm-base-490-hf") == folder


def test_zai_org_repo_found_under_thudm_offline(hub, cache, monkeypatch):
    hub.publish("zai-org/cogvlm2-llama3-chat-19B", SMALL)
    folder = resolve_model("zai-org/cogvlm2-llama3-chat-19B")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_model("THUDM/cogvlm2-llama3-chat-19B") == folder
    assert "not in the local hub cache" in one_line_error(resolve_model, "other/cogvlm2-llama3-chat-19B")


# ---- (f) errors -----------------------------------------------------------------------------------------


def test_repo_not_found(hub, cache):
    message = one_line_error(resolve_model, "THUDM/no-such-model")
    assert "THUDM/no-such-model: no such model on the Hugging Face hub" in message


def test_gated_repo(hub, cache):
    hub.publish("meta-llama/gated", SMALL, gated=True)
    message = one_line_error(resolve_model, "meta-llama/gated")
    assert "gated" in message and "request access" in message
    assert "hf auth login" in message and "HF_TOKEN" in message


def test_unreachable_hub(monkeypatch, tmp_path):
    point_hub(monkeypatch, closed_endpoint(), tmp_path / "cache")
    message = one_line_error(resolve_model, COGVLM_REPO)
    assert message == (
        f"cannot reach the Hugging Face hub to fetch {COGVLM_REPO}: check the network, "
        "or set HF_HUB_OFFLINE=1 to use the cache"
    )


def test_repo_without_config_or_weights(hub, cache):
    hub.publish("org/no-config", {"model.safetensors": b"weights"})
    hub.publish("org/no-weights", {"config.json": b"{}"})
    assert "no config.json in the repo" in one_line_error(resolve_model, "org/no-config")
    assert "no weights in the repo" in one_line_error(resolve_model, "org/no-weights")


def test_local_paths(tmp_path):
    assert resolve_model(TINY_SHAPES) == TINY_SHAPES
    assert (
        one_line_error(resolve_model, tmp_path / "missing") == f"{tmp_path / 'missing'}: not a model folder or hub id"
    )
    assert one_line_error(resolve_model, tmp_path) == f"{tmp_path}: no config.json (not a model folder)"


# ---- (g) the tokenizer ----------------------------------------------------------------------------------


def test_tokenizer_in_the_model_folder(tmp_path):
    assert resolve_tokenizer(None, TINY_SHAPES) == TINY_SHAPES  # nothing asked of the hub


def test_tokenizer_falls_back_to_vicuna(hub, cache, tmp_path):
    assert resolve_tokenizer(None, tmp_path) == snapshot(cache, VICUNA_TOKENIZER)
    assert VICUNA_BIN not in hub.requested("GET") + hub.requested("HEAD")


def test_tokenizer_fallback_unavailable_offline(monkeypatch, tmp_path):
    point_hub(monkeypatch, closed_endpoint(), tmp_path / "cache", offline=True)
    message = one_line_error(resolve_tokenizer, None, tmp_path)
    assert message.startswith(f"{tmp_path}: no tokenizer in the model folder and {VICUNA_TOKENIZER} could not be had (")
    assert "not in the local hub cache" in message
    assert message.endswith("; pass --tokenizer FOLDER_OR_HUB_ID")
    assert "--tokenizer" in one_line_error(resolve_tokenizer, None, tmp_path, fallback=None)


def test_explicit_tokenizer(offline_hub_cache, tmp_path):
    assert resolve_tokenizer(TINY_SHAPES, tmp_path) == TINY_SHAPES
    assert resolve_tokenizer(VICUNA_REPO, TINY_SHAPES) == snapshot(offline_hub_cache, VICUNA_REPO)
    assert "no tokenizer" in one_line_error(resolve_tokenizer, tmp_path, TINY_SHAPES)


# ---- (h) what counts as a hub id ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref, expected",
    [
        ("THUDM/cogvlm-chat-hf", True),
        (Path("zai-org/cogvlm-chat-hf"), True),
        ("lmsys/vicuna-7b-v1.5", True),
        ("gpt2", False),
        ("a/b/c", False),
        ("/abs/folder", False),
        ("./folder", False),
        ("~/x", False),
        ("a//b", False),
        ("a/b--c", False),
        ("a/..", False),
        ("", False),
    ],
)
def test_is_hub_id(ref, expected):
    assert is_hub_id(ref) is expected


def test_an_existing_folder_is_not_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "THUDM" / "cogvlm-chat-hf").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_hub_id("THUDM/cogvlm-chat-hf")
    assert one_line_error(resolve_model, "THUDM/cogvlm-chat-hf").endswith("no config.json (not a model folder)")
