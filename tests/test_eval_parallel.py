"""Data-parallel evaluation: the shards partition the questions; processes that each answer
their shard, merged once, score exactly as one process; a crash resumes with another number of
processes, asking only what is missing. First simulated rank by rank in this process (fast, and
every question asked is counted), then for real under torchrun: 2 CPU processes over gloo.

This file is also the worker torchrun starts for the crash test: `python tests/test_eval_parallel.py worker ...`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from cogvlm import launcher
from cogvlm.cli import main
from cogvlm.errors import CogVLMError
from cogvlm.eval import get_task, load_items, run
from cogvlm.eval.parallel import shard

ANSWERS = ["yes", "no", "left", "red", "two", "yes", "cat", "blue", "no", "dog", "three", "right"]
STEM = "gqa-testdev_balanced"


def write_gqa(data: Path) -> Path:
    """A 12-question GQA test-dev folder in the official layout."""
    (data / "images").mkdir(parents=True)
    questions = {}
    for k, answer in enumerate(ANSWERS):
        kind = "verify" if answer in ("yes", "no") else "query"
        questions[f"q{k}"] = {
            "imageId": f"i{k}",
            "question": f"question {k}?",
            "answer": answer,
            "types": {"structural": kind},
        }
        Image.new("RGB", (8, 8)).save(data / "images" / f"i{k}.jpg")
    (data / "testdev_balanced_questions.json").write_text(json.dumps(questions))
    return data


class Fake:
    """Question k: right when k is even, else "wrong"; records what it is asked; `crash_at` makes
    the given call raise (like a killed process)."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.asked: list[str] = []
        self.calls, self.crash_at = 0, crash_at

    def batch(self, requests, **gen):
        self.calls += 1
        if self.calls == self.crash_at:
            raise KeyboardInterrupt
        ks = [int(r["query"].split()[1].rstrip("?")) for r in requests]
        self.asked += [f"q{k}" for k in ks]
        return [ANSWERS[k] if k % 2 == 0 else "wrong" for k in ks]


def run_gqa(data: Path, out: Path, pipeline) -> dict:
    task = get_task("gqa")
    items, _ = load_items(task, data, "testdev_balanced")
    return run(task, items, pipeline, split="testdev_balanced", model="fake", out=out, batch_size=2, progress=False)


def comparable(result: dict | None) -> dict:
    return {k: v for k, v in (result or {}).items() if k != "seconds"}


@pytest.fixture
def gqa_dir(tmp_path: Path) -> Path:
    return write_gqa(tmp_path / "gqa")


@pytest.fixture
def ranks(monkeypatch):
    """`launch(size, work)` runs work(rank) as ranks 0..size-1 in threads of this process, with
    a real barrier (outside them: one process). A rank that raises breaks the barrier, so the
    others stop too, as torchrun stops every process when one dies. Returns each rank's result."""
    local, shared = threading.local(), {}
    monkeypatch.setattr(launcher, "world", lambda: (getattr(local, "rank", 0), getattr(local, "size", 1)))
    monkeypatch.setattr(launcher, "barrier", lambda: getattr(local, "size", 1) > 1 and shared["barrier"].wait(30))
    monkeypatch.setattr(launcher, "from_rank0", lambda value: value)  # rank 0 returns the result

    def launch(size: int, work) -> tuple[list, list]:
        shared["barrier"] = threading.Barrier(size)
        results, errors = [None] * size, [None] * size

        def body(rank: int) -> None:
            local.rank, local.size = rank, size
            try:
                results[rank] = work(rank)
            except BaseException as e:  # a crash of this "process", KeyboardInterrupt included
                errors[rank] = e
                shared["barrier"].abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return results, errors

    return launch


# ----------------------------------------------------------------------------- in one process
def test_shards_deal_out_every_question_once():
    items = list(range(11))
    for size in (1, 2, 3, 5):
        shards = [shard(items, rank, size) for rank in range(size)]
        assert sorted(i for s in shards for i in s) == items
        assert max(map(len, shards)) - min(map(len, shards)) <= 1  # even


def test_ranks_answer_their_shards_and_rank0_merges_to_the_single_process_result(gqa_dir, tmp_path, ranks):
    single = run_gqa(gqa_dir, tmp_path / "single", Fake())
    assert single["scores"] == {"accuracy": 0.5}  # the 6 even questions of 12
    out = tmp_path / "two"
    pipelines = [Fake(), Fake()]
    results, errors = ranks(2, lambda rank: run_gqa(gqa_dir, out, pipelines[rank]))
    assert errors == [None, None] and results[1] is None  # only rank 0 scores
    assert pipelines[0].asked == [f"q{k}" for k in range(0, 12, 2)]
    assert pipelines[1].asked == [f"q{k}" for k in range(1, 12, 2)]
    assert comparable(results[0]) == comparable(single)
    assert not list(out.glob("*.part*.jsonl"))  # merged, then removed
    merged = (out / f"{STEM}.predictions.jsonl").read_text()
    assert merged == (tmp_path / "single" / f"{STEM}.predictions.jsonl").read_text()  # in question order
    assert (out / "summary.md").read_text() == (tmp_path / "single" / "summary.md").read_text()


def test_a_crash_resumes_with_another_number_of_processes(gqa_dir, tmp_path, ranks):
    single = run_gqa(gqa_dir, tmp_path / "single", Fake())
    out = tmp_path / "out"
    # three processes: each has 4 questions (2 batches); rank 2 dies at its second batch, and
    # the others stop where they are (at the latest at the barrier before the merge)
    pipelines = [Fake(), Fake(), Fake(crash_at=2)]
    results, errors = ranks(3, lambda rank: run_gqa(gqa_dir, out, pipelines[rank]))
    assert isinstance(errors[2], KeyboardInterrupt) and results == [None, None, None]
    with (out / f"{STEM}.predictions.part2.jsonl").open("a") as f:
        f.write('{"id": "q8", "ans')  # a line torn by the crash
    answered = {q for p in pipelines for q in p.asked}  # at most 4 + 4 + 2: the others may stop early
    assert 2 <= len(answered) <= 10 and len(pipelines[2].asked) == 2
    # resumed with two processes: what is left is dealt out evenly
    pipelines = [Fake(), Fake()]
    results, errors = ranks(2, lambda rank: run_gqa(gqa_dir, out, pipelines[rank]))
    assert errors == [None, None]
    asked = pipelines[0].asked + pipelines[1].asked
    assert sorted(asked) == sorted({f"q{k}" for k in range(12)} - answered)
    assert abs(len(pipelines[0].asked) - len(pipelines[1].asked)) <= 1
    assert comparable(results[0]) == comparable(single)
    assert not list(out.glob("*.part*.jsonl"))
    again = Fake()  # and one process finds everything answered
    assert comparable(run_gqa(gqa_dir, out, again)) == comparable(single) and again.calls == 0


def test_merge_refuses_when_a_question_has_no_answer(gqa_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(launcher, "world", lambda: (0, 2))  # rank 1 never comes: half the questions unasked
    monkeypatch.setattr(launcher, "barrier", lambda: None)
    with pytest.raises(CogVLMError, match="6 questions have no answer after the run"):
        run_gqa(gqa_dir, tmp_path / "out", Fake())


# ----------------------------------------------------------------------------- torchrun, 2 CPU processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run` on this machine (CPU, gloo); `--` ends its own options
    (cogvlm's `--n` is a prefix of several of torchrun's)."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    command += [f"--master-port={free_port()}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_torchrun_two_processes_score_exactly_as_one(tmp_path, capsys):
    args = ["eval", "shapes", "--n", "1", "--device", "cpu", "--batch-size", "4"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    one_printed = capsys.readouterr().out
    done = torchrun(2, "-m", "cogvlm.cli", "--", *args, "--out", str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-3000:]
    name = "shapes-seed999999-n1"
    one, two = (json.loads((tmp_path / d / f"{name}.results.json").read_text()) for d in ("one", "two"))
    assert comparable(two) == comparable(one)
    assert 0 < one["scores"]["accuracy"] < 1  # some right, some wrong: the equality means something
    for d in ("one", "two"):
        assert not list((tmp_path / d).glob("*.part*"))
    predictions = [(tmp_path / d / f"{name}.predictions.jsonl").read_text() for d in ("one", "two")]
    assert predictions[0] == predictions[1]
    assert done.stdout.count("overall") == 1 and one_printed.splitlines()[:11] == done.stdout.splitlines()[:11]


def test_torchrun_kill_and_resume_with_three_processes(gqa_dir, tmp_path):
    single = run_gqa(gqa_dir, tmp_path / "single", Fake())
    out = tmp_path / "out"
    killed = torchrun(2, __file__, "worker", str(gqa_dir), str(out), "1")  # rank 1 dies at its 2nd batch
    assert killed.returncode != 0
    logs = [out / f"{STEM}.predictions.jsonl", *out.glob(f"{STEM}.predictions.part*.jsonl")]
    answered = {json.loads(x).get("id") for p in logs if p.is_file() for x in p.read_text().splitlines()[1:]}
    missing = {f"q{k}" for k in range(12)} - answered
    assert missing  # rank 1's unanswered questions at least
    resumed = torchrun(3, __file__, "worker", str(gqa_dir), str(out), "-1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    asked = [q for rank in range(3) for q in json.loads((out / f"asked{rank}.json").read_text())]
    assert sorted(asked) == sorted(missing)
    result = json.loads((out / f"{STEM}.results.json").read_text())
    assert comparable(result) == comparable(single)


def worker(data: str, out: str, crash_rank: str) -> None:
    """One torchrun process of the crash test: run gqa with the fake model, the process of rank
    `crash_rank` dying at its second batch; write what this process was asked to asked{rank}.json."""
    launcher.join()
    rank = launcher.world()[0]
    pipeline = Fake(crash_at=2 if rank == int(crash_rank) else None)
    try:
        run_gqa(Path(data), Path(out), pipeline)
    except KeyboardInterrupt:
        os._exit(1)  # like a killed process: no cleanup
    (Path(out) / f"asked{rank}.json").write_text(json.dumps(pipeline.asked))
    launcher.leave()


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(*sys.argv[2:])
