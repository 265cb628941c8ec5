"""The published checkpoints as a user gets them: `THUDM/cogvlm-chat-hf` laid out as the hub holds
it (8 shards + index, remote-code files, no tokenizer) in a hub cache, used offline by hub id from
`cogvlm ask`, `cogvlm serve --quantize int8` and `cogvlm eval shapes`, must answer exactly as the
same weights loaded from a plain folder do, with `--tokenizer` given or left to the Vicuna rule."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import cogvlm
from cogvlm.loading import DEFAULT_MODEL

REPO = "THUDM/cogvlm-chat-hf"
IMAGE = Path(__file__).parent.parent / "examples" / "scene.png"
QUESTIONS = ["What color is the star?", "How many shapes are there?"]


@pytest.fixture(scope="module")
def offline_env(hub_cache) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache), "HF_HOME": str(hub_cache.parent)}


@pytest.fixture(scope="module")
def folder_answers() -> dict[str, str]:
    """What the plain folder answers (the shipped model loaded straight from the package)."""
    vlm = cogvlm.load(DEFAULT_MODEL, device="cpu")
    return {q: vlm.chat(q, IMAGE) for q in QUESTIONS}


def _cogvlm(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cogvlm.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_cache_holds_the_published_layout(hub_cache):
    snapshot = next((hub_cache / "models--THUDM--cogvlm-chat-hf" / "snapshots").iterdir())
    names = {p.name for p in snapshot.iterdir()}
    assert {f"model-0000{i}-of-00008.safetensors" for i in range(1, 9)} <= names
    assert {"model.safetensors.index.json", "config.json", "generation_config.json", "modeling_cogvlm.py"} <= names
    assert not names & {"tokenizer.model", "tokenizer.json"}


@pytest.mark.parametrize("tokenizer", [None, "lmsys/vicuna-7b-v1.5"])
def test_ask_by_hub_id_equals_the_folder(offline_env, folder_answers, tokenizer):
    for question in QUESTIONS:
        extra = ["--tokenizer", tokenizer] if tokenizer else []
        proc = _cogvlm(
            "ask", str(IMAGE), "-q", question, "--model", REPO, "--device", "cpu", "--json", *extra, env=offline_env
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["answer"] == folder_answers[question]


def test_zai_org_name_and_missing_tokenizer_errors(offline_env, hub_cache, tmp_path):
    proc = _cogvlm(
        "ask", str(IMAGE), "-q", QUESTIONS[0], "--model", "zai-org/cogvlm-chat-hf", "--device", "cpu", env=offline_env
    )
    assert proc.returncode == 0, proc.stderr
    # A cache without the Vicuna tokenizer: one line naming the flag to pass.
    empty = {**offline_env, "HF_HUB_CACHE": str(tmp_path)}
    (tmp_path / "models--THUDM--cogvlm-chat-hf").symlink_to(hub_cache / "models--THUDM--cogvlm-chat-hf")
    proc = _cogvlm("ask", str(IMAGE), "-q", QUESTIONS[0], "--model", REPO, env=empty)
    assert proc.returncode == 2 and "--tokenizer" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    proc = _cogvlm("ask", str(IMAGE), "-q", QUESTIONS[0], "--model", "THUDM/no-such-model", env=offline_env)
    assert proc.returncode == 2 and "not in the local hub cache" in proc.stderr, proc.stderr


def test_eval_by_hub_id_equals_the_folder(offline_env, tmp_path):
    results = {}
    for name, model in (("hub", REPO), ("folder", str(DEFAULT_MODEL))):
        out = tmp_path / name
        proc = _cogvlm(
            "eval", "shapes", "--model", model, "--n", "2", "--out", str(out), "--device", "cpu", env=offline_env
        )
        assert proc.returncode == 0, proc.stderr
        predictions = sorted(out.glob("*.predictions.jsonl"))
        assert len(predictions) == 1
        rows = [json.loads(line) for line in predictions[0].read_text().splitlines()[1:]]  # after the settings
        results[name] = {row["id"]: row["raw"] for row in rows}
    assert results["hub"] == results["folder"] and len(results["hub"]) > 10


def test_serve_int8_by_hub_id_equals_the_folder(offline_env):
    import openai

    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cogvlm.cli",
            "serve",
            "--model",
            REPO,
            "--quantize",
            "int8",
            "--port",
            "0",
            "--device",
            "cpu",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=offline_env,
    )
    try:
        url = None
        while url is None:
            line = process.stderr.readline()
            assert line, "the server exited before listening"
            found = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
            url = found and found.group(1)
        deadline = time.monotonic() + 120
        while httpx.get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        assert REPO in [m.id for m in client.models.list().data]
        expected = cogvlm.load(DEFAULT_MODEL, device="cpu", quantize="int8")
        data_url = "data:image/png;base64," + __import__("base64").b64encode(IMAGE.read_bytes()).decode()
        for question in QUESTIONS:
            reply = client.chat.completions.create(
                model=REPO,
                max_tokens=32,
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": question},
                            {"type": "image_url", "image_url": {"url": data_url}},
                        ],
                    }
                ],
            )
            assert reply.choices[0].message.content == expected.chat(question, IMAGE, max_new_tokens=32)
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0


def test_train_lora_on_a_hub_id(offline_env, tmp_path):
    """The base model of `cogvlm train` goes through the same loading: a hub id, the Vicuna rule."""
    import yaml

    config = {
        "model": REPO,
        "mode": "lora",
        "cpu": True,
        "output_dir": str(tmp_path / "run"),
        "max_steps": 2,
        "batch_size": 2,
        "save_every": 0,
        "eval_every": 0,
        "data": [{"type": "synthetic", "seed": 1}],
    }
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(config))
    proc = _cogvlm("train", str(tmp_path / "lora.yaml"), env=offline_env)
    assert proc.returncode == 0, proc.stderr
    adapter = json.loads((Path(proc.stdout.strip().splitlines()[-1]) / "adapter_config.json").read_text())
    base = Path(adapter["base_model_name_or_path"])  # the resolved snapshot, which loads on its own
    assert (base / "config.json").is_file() and "models--THUDM--cogvlm-chat-hf" in str(base)
