"""The `cogvlm` command: JSON output, grounding output, and one-line errors with status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from cogvlm.chat import interactive_chat
from cogvlm.cli import main


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cogvlm.cli", *args], capture_output=True, text=True, input=stdin, timeout=300
    )


def test_ask_json_batched(reference_dir, capsys):
    imgs = [str(reference_dir / "images" / f"img{i}.png") for i in (0, 1)]
    code = main(
        [
            "ask",
            *imgs,
            "--query",
            "Describe this image.",
            "--model",
            str(reference_dir),
            "--max-new-tokens",
            "8",
            "--json",
            "--batch-size",
            "2",
        ]
    )
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in lines] == imgs
    for record in lines:
        assert {"image", "query", "answer", "boxes", "seconds"} <= set(record)
        assert record["query"] == "Describe this image." and record["seconds"] >= 0
    # The fixture's official greedy answer for img0 with this prompt (8 tokens).
    assert lines[0]["answer"] == "\ufffd\u0001reet manye4 ball\ufffd"


def test_ground_draw_and_box_query(reference_dir, tmp_path, capsys):
    image = str(reference_dir / "images" / "img0.png")
    out = tmp_path / "boxes.png"
    assert (
        main(
            [
                "ground",
                image,
                "--query",
                "the dog",
                "--model",
                str(reference_dir),
                "--max-new-tokens",
                "4",
                "--draw",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    record = json.loads(capsys.readouterr().out)
    assert record["query"] == "Where is the dog?"
    assert Image.open(out).size == (64, 48)
    assert (
        main(["ground", image, "--box", "10,5,40,30", "--model", str(reference_dir), "--max-new-tokens", "4", "--json"])
        == 0
    )
    record = json.loads(capsys.readouterr().out)
    assert record["query"] == "Tell me what you see within the designated area [[156,104,625,625]] in the picture."


@pytest.mark.parametrize(
    "args,needle",
    [
        (["ask", "missing.png", "-q", "hi", "--model", "{ref}"], "missing.png: no such image file"),
        (["ask", "{bad_image}", "-q", "hi", "--model", "{ref}"], "not a readable image"),
        (["ask", "{image}", "-q", "hi", "--model", "{tmp}"], "no config.json"),
        (
            ["ask", "{image}", "-q", "hi", "--model", "{ref}", "--temperature", "0", "--do-sample"],
            "temperature must be > 0",
        ),
        (["ask", "{image}"], "required"),
        (["ask", "{image}", "-q", "hi", "--max-new-tokens", "x"], "invalid int value"),
        (["ask", "{image}", "-q", " \t"], "--query/-q: must not be empty or blank"),
        (["ask", "{image}", "-q", "hi", "--max-new-tokens", "0", "--model", "{tmp}"], "max_new_tokens must be >= 1"),
        (["ask", "{image}", "-q", "hi", "--device", "cuda:x"], "unknown device"),
        (["serve", "--max-batch", "0", "--model", "{tmp}"], "--max-batch must be >= 1"),
        (["eval", "gqa", "--bogus"], "cogvlm eval: error: unrecognized arguments: --bogus"),
        (["info", "{tmp}", "--dtype", "float8"], "unknown dtype"),
        (["ground", "{image}", "--model", "{ref}"], "exactly one of --query"),
        (["ground", "{image}", "--box", "1,2,3", "--model", "{ref}"], "bad box"),
        (["info", "no-such-preset"], "unknown preset"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_user_errors_one_line_status_2(args, needle, reference_dir, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    values = {
        "ref": str(reference_dir),
        "image": str(reference_dir / "images" / "img0.png"),
        "bad_image": str(bad),
        "tmp": str(tmp_path),
    }
    proc = run(*[a.format(**values) for a in args])
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "loading weights" not in line]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_info_command():
    proc = run("info", "cogvlm-chat-17b")
    assert proc.returncode == 0 and "17.640 B" in proc.stdout


def test_data_synth_writes_multi_turn_records(tmp_path, capsys):
    assert (
        main(["data", "synth", "--out", str(tmp_path), "--n", "3", "--size", "64", "--per-scene", "2", "--turns", "3"])
        == 0
    )
    assert capsys.readouterr().out.strip() == str(tmp_path / "data.jsonl")
    records = [json.loads(line) for line in (tmp_path / "data.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all((tmp_path / r["image"]).is_file() for r in records)
    turns = [len(r["conversations"]) // 2 for r in records]
    assert max(turns) == 3 and all(t == 1 for r, t in zip(records, turns) if r["template_version"] != "vqa")


def test_interactive_chat_keeps_history_and_clears(reference_dir):
    class Recorder:
        def __init__(self):
            self.calls = []

        def stream(self, query, image, history, template, **gen):
            self.calls.append((query, image is not None, list(history)))
            yield "ans-"
            yield query

    inputs = iter(["first", "second", "clear", str(reference_dir / "images" / "img1.png"), "third", "exit"])
    out: list[str] = []
    vlm = Recorder()
    assert (
        interactive_chat(
            vlm,
            str(reference_dir / "images" / "img0.png"),
            None,
            {},
            read=lambda prompt: next(inputs),
            write=out.append,
        )
        == 0
    )
    assert vlm.calls[0] == ("first", True, [])
    assert vlm.calls[1] == ("second", True, [("first", "ans-first")])
    assert vlm.calls[2] == ("third", True, [])  # the new image started a new conversation
    assert "ans-second" in "".join(out)


def test_interactive_chat_ctrl_c_stops_answer_only():
    class Interrupted:
        def stream(self, query, image, history, template, **gen):
            yield "partial"
            raise KeyboardInterrupt

    inputs = iter(["go", "again"])

    def read(prompt):
        try:
            return next(inputs)
        except StopIteration:
            raise EOFError

    out: list[str] = []
    assert interactive_chat(Interrupted(), None, None, {}, read=read, write=out.append) == 0
    assert "".join(out).count("[stopped]") == 2


def test_chat_command_text_only(reference_dir):
    proc = run("chat", "--model", str(reference_dir), "--max-new-tokens", "3", stdin="hello\nexit\n")
    assert proc.returncode == 0, proc.stderr
    assert "CogVLM: " in proc.stdout
