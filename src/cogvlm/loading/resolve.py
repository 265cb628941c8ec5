"""What `--model` and `--tokenizer` name, turned into local folders: a folder as it is, a hub id
("owner/name") as its snapshot folder in the standard Hugging Face cache.

Only what loading needs is fetched (config, generation config, one weight format, tokenizer files,
the small remote-code `.py` files), through huggingface_hub so its progress bars, cache layout,
tokens (`hf auth login`, HF_TOKEN), HF_HOME / HF_HUB_CACHE and HF_ENDPOINT all apply. With
HF_HUB_OFFLINE=1 or `local_files_only=True` nothing goes over the network: ids come from the cache.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from ..errors import CheckpointError
from ..tokenizer import TOKENIZER_FILES
from .files import BIN_INDEX, SAFE_INDEX

#: The official CogVLM-1 model card loads its tokenizer from here (the checkpoints ship none).
VICUNA_TOKENIZER = "lmsys/vicuna-7b-v1.5"
#: The THUDM organisation on the hub was renamed; the cache keeps the name used at download.
_ORG_ALIASES = {"THUDM": "zai-org", "zai-org": "THUDM"}
_TOKENIZER_MAIN = ("tokenizer.model", "tokenizer.json")

# Picks the repo files to fetch from the listing; gets the repo id, its commit and the listing.
_Chooser = Callable[[str, str, set[str]], list[str]]


def is_hub_id(ref: str | Path) -> bool:
    """True for "owner/name" (hub repo-id syntax) that is not an existing local path."""
    text = str(ref)
    if text.count("/") != 1 or Path(text).exists():
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def resolve_model(ref: str | Path, *, revision: str | None = None, local_files_only: bool | None = None) -> Path:
    """The model folder `ref` names: an existing folder, or a hub id's cached snapshot (fetched if needed).

    `revision` (branch, tag or commit) applies to hub ids; `local_files_only` (or HF_HUB_OFFLINE=1)
    uses the cache only.
    """
    return _with_config(_resolve(ref, revision, local_files_only, _model_files, probe=("config.json",)))


def resolve_config_file(ref: str | Path, *, revision: str | None = None, local_files_only: bool | None = None) -> Path:
    """The config.json of a folder or hub id (for `cogvlm info`, memory plans): only that file is fetched."""
    return _with_config(_resolve(ref, revision, local_files_only, _config_only, probe=("config.json",))) / "config.json"


def resolve_tokenizer(
    ref: str | Path | None,
    model_folder: Path,
    *,
    fallback: str | None = VICUNA_TOKENIZER,
    revision: str | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """The tokenizer folder: `ref` (folder or hub id; `revision` applies to it) when given, else the
    model folder when it has a tokenizer, else `fallback` (official CogVLM-1 repos ship no tokenizer)."""
    if ref is not None:
        return _tokenizer_folder(ref, revision, local_files_only)
    if _has_tokenizer(model_folder):
        return model_folder
    if fallback is None:
        raise CheckpointError(f"{model_folder}: no tokenizer in the model folder; pass --tokenizer FOLDER_OR_HUB_ID")
    try:
        return _tokenizer_folder(fallback, None, local_files_only)
    except CheckpointError as e:
        raise CheckpointError(
            f"{model_folder}: no tokenizer in the model folder and {fallback} could not be had "
            f"({e}); pass --tokenizer FOLDER_OR_HUB_ID"
        ) from e


def _with_config(folder: Path) -> Path:
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json (not a model folder)")
    return folder


def _tokenizer_folder(ref: str | Path, revision: str | None, local_files_only: bool | None) -> Path:
    folder = _resolve(ref, revision, local_files_only, _tokenizer_files, probe=_TOKENIZER_MAIN)
    if not _has_tokenizer(folder):
        raise CheckpointError(f"{folder}: no tokenizer ({' or '.join(_TOKENIZER_MAIN)})")
    return folder


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_MAIN)


def _resolve(
    ref: str | Path, revision: str | None, local_files_only: bool | None, choose: _Chooser, probe: tuple[str, ...]
) -> Path:
    """A folder as it is; a hub id from the cache (offline) or fetched with the files `choose` picks."""
    if str(ref) and Path(ref).is_dir():
        return Path(ref)
    if not is_hub_id(ref):
        raise CheckpointError(f"{ref}: not a model folder or hub id")
    repo_id = str(ref)
    offline = bool(local_files_only) or constants.is_offline_mode()
    try:
        if offline:
            return _cached(repo_id, revision, probe)
        return _fetch(repo_id, revision, choose)
    except (OSError, httpx2.HTTPError) as e:  # the hub's errors (OSError subclasses) span lines: make one
        raise CheckpointError(_hub_message(e, repo_id, revision, offline)) from e


def _fetch(repo_id: str, revision: str | None, choose: _Chooser) -> Path:
    """List the repo at `revision`, then fetch the chosen files into the cache (the hub's progress bars)."""
    info = HfApi().model_info(repo_id, revision=revision)
    files = {sibling.rfilename for sibling in info.siblings or ()}
    wanted = choose(repo_id, str(info.sha), files)
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=wanted))


def _cached(repo_id: str, revision: str | None, probe: tuple[str, ...]) -> Path:
    """The snapshot folder holding one of `probe` in the cache, under `repo_id` or its other org's name."""
    for name in _names(repo_id):
        for filename in probe:
            try:
                path = hf_hub_download(name, filename, revision=revision, local_files_only=True)
            except LocalEntryNotFoundError:
                continue
            return Path(path).parent
    raise LocalEntryNotFoundError(f"{repo_id}: not in the cache")


def _names(repo_id: str) -> list[str]:
    """`repo_id`, then the same repo under the renamed organisation's other name (THUDM <-> zai-org)."""
    owner, name = repo_id.split("/")
    other = _ORG_ALIASES.get(owner)
    return [repo_id, f"{other}/{name}"] if other else [repo_id]


def _config_only(repo_id: str, commit: str, files: set[str]) -> list[str]:
    if "config.json" not in files:
        raise CheckpointError(f"{repo_id}: no config.json in the repo (not a model)")
    return ["config.json"]


def _model_files(repo_id: str, commit: str, files: set[str]) -> list[str]:
    """config, generation config, one weight format (safetensors first), tokenizer and remote-code files."""
    extras = [
        f
        for f in files
        if f == "generation_config.json" or f in TOKENIZER_FILES or (f.endswith(".py") and "/" not in f)
    ]
    return [*_config_only(repo_id, commit, files), *sorted(extras), *_weight_files(repo_id, commit, files)]


def _weight_files(repo_id: str, commit: str, files: set[str]) -> list[str]:
    """The weights as `files.weight_files` would pick them: an index and the shards it names, or one file."""
    for index, single in ((SAFE_INDEX, "model.safetensors"), (BIN_INDEX, "pytorch_model.bin")):
        if index in files:
            return [index, *_shards(repo_id, commit, index)]
        if single in files:
            return [single]
    raise CheckpointError(
        f"{repo_id}: no weights in the repo (model.safetensors, {SAFE_INDEX}, pytorch_model.bin or {BIN_INDEX})"
    )


def _shards(repo_id: str, commit: str, index: str) -> list[str]:
    path = hf_hub_download(repo_id, index, revision=commit)
    try:
        return sorted(set(json.loads(Path(path).read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{repo_id}: {index} is not a valid weight index (no weight_map)") from None


def _tokenizer_files(repo_id: str, commit: str, files: set[str]) -> list[str]:
    if not files & set(_TOKENIZER_MAIN):
        raise CheckpointError(f"{repo_id}: no tokenizer in the repo ({' or '.join(_TOKENIZER_MAIN)})")
    return sorted(files & set(TOKENIZER_FILES))


def _hub_message(error: Exception, repo_id: str, revision: str | None, offline: bool) -> str:
    """One line saying what went wrong with a hub id and what to do about it."""
    if offline and isinstance(error, LocalEntryNotFoundError):
        why = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "local_files_only is set"
        at = f" at revision {revision}" if revision else ""
        return f"{repo_id}{at} is not in the local hub cache ({why}): run once with network, or pass a folder"
    if isinstance(error, GatedRepoError):
        return (
            f"{repo_id} is gated: request access on its model page ({constants.ENDPOINT}/{repo_id}) and log in "
            "(`hf auth login` or HF_TOKEN)"
        )
    if isinstance(error, RepositoryNotFoundError):
        return (
            f"{repo_id}: no such model on the Hugging Face hub (check the id; for a private repo log in with "
            "`hf auth login` or HF_TOKEN)"
        )
    if isinstance(error, RevisionNotFoundError):
        return f"{repo_id}: no revision '{revision}' (branch, tag or commit) on the Hugging Face hub"
    if isinstance(error, RemoteEntryNotFoundError):
        return f"{repo_id}: a file the repo lists is missing on the Hugging Face hub; try again later"
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        return f"{repo_id}: the Hugging Face hub answered HTTP {error.response.status_code}; try again later"
    if isinstance(error, (httpx2.TransportError, LocalEntryNotFoundError)):
        return (
            f"cannot reach the Hugging Face hub to fetch {repo_id}: check the network, "
            "or set HF_HUB_OFFLINE=1 to use the cache"
        )
    return f"{repo_id}: fetching from the Hugging Face hub failed ({' '.join(str(error).split())[:200]}); try again"
