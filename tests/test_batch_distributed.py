"""Batch jobs across processes: torchrun (gloo, CPU) and a real local Ray cluster give one process's rows."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cogvlm.batch import batch_infer
from cogvlm.batch.shard import shard_of
from test_batch import data, one_thread_each, read_rows, reference, vlm  # noqa: F401 (fixtures)


def test_two_processes_under_torchrun_give_the_rows_of_one_and_resume_what_one_began(data, vlm, reference, tmp_path):  # noqa: F811
    photo_ids = [row["id"] for row in reference["rows"]][:6]
    assert {shard_of(i, 2) for i in photo_ids} == {0, 1}  # both processes have work
    out = tmp_path / "rows.jsonl"
    begun = batch_infer(data["manifest"], out, model=vlm)  # one process did the manifest
    assert (begun.done, begun.failed) == (2, 1)
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"),
        *("-m", "cogvlm.cli", "batch", str(data["photos"]), str(data["manifest"]), "--out", str(out)),
        *("--device", "cpu", "--no-progress"),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "6 done, 2 skipped, 3 failed" in run.stderr  # no image answered twice, none left out
    assert read_rows(out) == reference["rows"]
    assert {e["id"] for e in read_rows(out.with_name("rows.jsonl.errors.jsonl"))} == {
        "broken.png",
        "deep/cut.png",
        "gone",
    }
    assert not out.with_name("rows.jsonl.parts").exists()


def test_a_local_ray_cluster_with_two_cpu_actors_gives_the_rows_of_one_process(data, reference, tmp_path):  # noqa: F811
    import ray

    out = tmp_path / "rows.jsonl"
    summary = batch_infer([data["photos"], data["manifest"]], out, ray="local", ray_actors=2, batch_size=4)
    assert (summary.done, summary.skipped, summary.failed) == (8, 0, 3)
    assert read_rows(out) == reference["rows"]
    assert {e["id"] for e in read_rows(summary.errors)} == {"broken.png", "deep/cut.png", "gone"}
    assert not ray.is_initialized()  # the instance started for the job is stopped after it


OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}
_ENDS_LAUNCHED = """
import atexit, sys
from cogvlm import launcher
from cogvlm.cli import main
launcher._joined = True  # as after launcher.join() under torchrun
atexit.register(print, "teardown ran")
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(("argv", "code"), [(["info", "default"], 0), (["info", "no/such-model"], 2)])
def test_a_launched_command_ends_without_the_interpreters_teardown(argv, code):
    """A command that joined a launcher's group ends through os._exit once it returns: its output
    flushed, its exit status kept, and no teardown run (where a gloo thread could abort it)."""
    run = subprocess.run(
        [sys.executable, "-c", _ENDS_LAUNCHED, *argv], capture_output=True, text=True, timeout=120, env=OFFLINE
    )
    assert run.returncode == code, run.stderr
    assert ("7.00 M" in run.stdout) == (code == 0) and ("error" in run.stderr) == (code != 0)
    assert "teardown ran" not in run.stdout


def test_a_process_meets_the_others_before_leaving_the_group_unless_its_job_failed(monkeypatch):
    """A clean exit waits at a barrier (no process tears the group down while another is still in
    a collective); after a failure it leaves at once (the others may be gone: a barrier would hang)."""
    import torch.distributed as dist

    from cogvlm import launcher

    calls: list[str] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    launcher.leave()
    assert calls == ["barrier", "destroy"]
    calls.clear()
    launcher.leave(clean=False)
    assert calls == ["destroy"]
