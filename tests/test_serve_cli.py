"""`cogvlm serve` through `cli_main`: argument errors, and a real server process that loads the
model in the background, answers 503 then 200 on /health, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest

from cogvlm.cli import main
from cogvlm.cli.options import load_pipeline

LAUNCH = "import sys; from cogvlm.cli import main; sys.exit(main(['serve', *sys.argv[1:]]))"


@pytest.mark.parametrize(
    "argv",
    [
        ["--model", "/nonexistent"],
        ["--max-batch", "0"],
        ["--max-queue", "-1"],
        ["--timeout", "0"],
        ["--image-cache-mb", "-1"],
        ["--port", "http"],
        ["--bogus"],
    ],
)
def test_bad_arguments_exit_2(argv, reference_dir, capsys):
    argv = argv if argv[0] == "--model" else ["--model", str(reference_dir), *argv]
    assert main(["serve", *argv]) == 2
    error = capsys.readouterr().err
    assert "error:" in error and len(error.strip().splitlines()) == 1


def test_help(capsys):
    assert main(["serve", "--help"]) == 0
    assert "--allow-remote-images" in capsys.readouterr().out


def test_image_cache_flag_sizes_the_pipelines_cache(reference_dir, monkeypatch):
    import cogvlm.cli.serve as command
    import cogvlm.serve

    served = []
    monkeypatch.setattr(cogvlm.serve, "serve_forever", lambda app, host, port: served.append(app))
    loaded = []
    monkeypatch.setattr(command, "load_pipeline", lambda args: loaded.append(load_pipeline(args)) or loaded[-1])
    assert main(["serve", "--model", str(reference_dir), "--device", "cpu", "--image-cache-mb", "8"]) == 0
    assert served and loaded[0].image_cache.max_bytes == 8 * 2**20


def test_serve_process(reference_dir):
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            LAUNCH,
            "--model",
            str(reference_dir),
            "--port",
            "0",
            "--api-key",
            "k",
            "--max-batch",
            "2",
            "--device",
            "cpu",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = None
        while url is None:
            line = process.stderr.readline()
            assert line, "the server exited before listening"
            found = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
            url = found and found.group(1)
        deadline = time.monotonic() + 30
        while (health := httpx.get(url + "/health")).status_code != 200:
            assert health.status_code == 503 and time.monotonic() < deadline
            time.sleep(0.05)
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k"}).json()
        assert [m["id"] for m in models["data"]] == ["reference-tiny", "cogvlm-chat-17b"]
        reply = httpx.post(
            url + "/v1/chat/completions",
            headers={"Authorization": "Bearer k"},
            json={"model": "reference-tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]},
        )
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0


def test_serve_exits_with_the_reason_when_the_model_cannot_load(reference_dir, tmp_path):
    """A model that fails to load ends the command before any port is bound (no 503s forever)."""
    folder = tmp_path / "broken"
    shutil.copytree(reference_dir, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 3])
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCH, "--model", str(folder), "--port", "0", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "corrupt or truncated" in proc.stderr and "running on" not in proc.stderr
