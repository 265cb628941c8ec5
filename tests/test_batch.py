"""Batch jobs on one process: inputs, rows, errors, resume after a kill, shards and Parquet.

The data: synthetic shape scenes (the shipped model answers them, greedy and deterministic), two
corrupt images in the folder and one manifest row whose file is missing. What a row must hold is
what `cogvlm ask` (or `cogvlm caption`) answers for that image alone.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import cogvlm
from cogvlm.batch import CAPTION_QUERY, Columns, batch_infer
from cogvlm.batch.images import Failure, Prepared, prepare
from cogvlm.batch.shard import shard_of
from cogvlm.batch.sources import Item, collect
from cogvlm.batch.store import Journal, OutputStore, read_journal
from cogvlm.cli import main
from cogvlm.errors import CogVLMError
from cogvlm.synthetic import make_scene

MANIFEST_QUERY = "How many shapes are there?"


def draw_photos(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n scenes, half of them in a subfolder, of two sizes (so pixel boxes differ from normalised)."""
    paths = []
    for i in range(n):
        path = folder / ("deep" if i % 2 else ".") / f"scene{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        make_scene(random.Random(seed + i), size=112 if i % 3 else 160).render().save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """photos/ (6 scenes, 2 corrupt files) and a manifest (2 scenes with extra columns, 1 missing file)."""
    root = tmp_path_factory.mktemp("batch")
    photos = draw_photos(root / "photos", 6)
    (root / "photos" / "broken.png").write_bytes(b"this is not a png")
    (root / "photos" / "deep" / "cut.png").write_bytes(photos[0].read_bytes()[:60])  # a truncated PNG
    listed = draw_photos(root / "listed", 2, seed=100)
    rows = [
        {"id": "a", "image": "listed/scene00.png", "query": MANIFEST_QUERY, "split": "val", "source": "synth"},
        {"id": "b", "image": "listed/deep/scene01.png", "query": MANIFEST_QUERY, "split": "test", "source": "synth"},
        {"id": "gone", "image": "listed/nowhere.png", "split": "val", "source": "lost"},
    ]
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "photos": root / "photos", "photo_paths": photos, "listed": listed, "manifest": manifest}


@pytest.fixture(scope="module", autouse=True)
def one_thread_each():
    """One torch thread here and in the commands run: on a busy 2-core machine a second thread waits on
    the first (the tiny model's batch of 24 took 0.7 s on one thread and 5.4 s on two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vlm():
    return cogvlm.load(device="cpu")


@pytest.fixture(scope="module")
def reference(data, vlm, tmp_path_factory) -> dict:
    """One process over the folder and the manifest: its summary, rows and errors."""
    out = tmp_path_factory.mktemp("reference") / "rows.jsonl"
    summary = batch_infer([data["photos"], data["manifest"]], out, model=vlm, batch_size=4)
    return {"summary": summary, "out": out, "rows": read_rows(out), "errors": read_rows(summary.errors)}


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def ask_alone(capsys, paths: list[Path], query: str, *flags: str) -> dict[str, str]:
    """`cogvlm ask ... --batch-size 1 --json`: each image's answer, asked alone."""
    capsys.readouterr()
    assert main(["ask", *map(str, paths), "-q", query, "--batch-size", "1", "--json", "--device", "cpu", *flags]) == 0
    return {json.loads(line)["image"]: json.loads(line)["answer"] for line in capsys.readouterr().out.splitlines()}


# ---- the proof: one row per good image, the answer `cogvlm ask` gives alone, three failures ----


def test_one_row_per_good_image_with_the_answer_ask_gives_alone(data, reference, capsys):
    rows = reference["rows"]
    ids = [row["id"] for row in rows]
    assert ids == [p.relative_to(data["photos"]).as_posix() for p in data["photo_paths"][::2]] + [
        p.relative_to(data["photos"]).as_posix() for p in data["photo_paths"][1::2]
    ] + ["a", "b"]  # folder order (top level, then the subfolder), then the manifest's
    alone = ask_alone(capsys, data["photo_paths"], CAPTION_QUERY)
    for row in rows[:6]:
        assert row["query"] == CAPTION_QUERY
        assert row["answer"] == alone[row["image"]], row
    alone = ask_alone(capsys, data["listed"], MANIFEST_QUERY)
    for row, path in zip(rows[6:], data["listed"]):
        assert (row["query"], row["answer"]) == (MANIFEST_QUERY, alone[str(path)])
    assert all(row["model"] == "default" and row["generation"]["template"] == "vqa" for row in rows)
    summary = reference["summary"]
    assert (summary.done, summary.skipped, summary.failed) == (8, 0, 3)
    assert 0 < summary.busy_share <= 1 and summary.images_per_s > 0


def test_the_errors_file_holds_the_three_failures(reference):
    reasons = {e["id"]: e["error"] for e in reference["errors"]}
    assert set(reasons) == {"broken.png", "deep/cut.png", "gone"}
    assert "not a readable image" in reasons["broken.png"] and "not a readable image" in reasons["deep/cut.png"]
    assert "no such image file" in reasons["gone"]
    assert all("\n" not in reason for reason in reasons.values())


def test_a_manifests_extra_columns_come_through(reference):
    listed = {row["id"]: row for row in reference["rows"] if row["id"] in ("a", "b")}
    assert {k: listed["a"][k] for k in ("split", "source", "image")} == {
        "split": "val",
        "source": "synth",
        "image": "listed/scene00.png",  # as the manifest wrote it
    }
    assert listed["b"]["split"] == "test"


def test_the_same_command_again_skips_what_is_done(data, vlm, reference, tmp_path):
    out = tmp_path / "rows.jsonl"
    out.write_bytes(reference["out"].read_bytes())
    again = batch_infer([data["photos"], data["manifest"]], out, model=vlm)
    assert (again.done, again.skipped, again.failed) == (0, 8, 3)  # failures are tried again
    assert read_rows(out) == reference["rows"]
    assert [e["id"] for e in read_rows(again.errors)] == [e["id"] for e in reference["errors"]]
    fresh = batch_infer([data["photos"], data["manifest"]], out, model=vlm, overwrite=True, batch_size=3)
    assert (fresh.done, fresh.skipped) == (8, 0)
    assert read_rows(out) == reference["rows"]  # another batch size, the same rows


# ---- killed mid-way (SIGKILL), restarted: the same rows, none twice ----


def test_a_killed_run_restarted_ends_with_the_same_rows(vlm, tmp_path, capsys):
    photos = tmp_path / "many"
    draw_photos(photos, 40, seed=7)
    expected = batch_infer(photos, tmp_path / "expected.jsonl", model=vlm)
    out = tmp_path / "rows.jsonl"
    argv = ["batch", str(photos), "--out", str(out), "--batch-size", "1", "--device", "cpu", "--no-progress"]
    run = subprocess.Popen([sys.executable, "-m", "cogvlm.cli", *argv], stderr=subprocess.PIPE)
    journal = tmp_path / "rows.jsonl.parts" / "rows-0.jsonl"
    deadline = time.monotonic() + 120
    while not (journal.exists() and journal.read_bytes().count(b"\n") >= 2):
        assert run.poll() is None and time.monotonic() < deadline, run.stderr.read().decode()
        time.sleep(0.005)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not out.exists()  # killed before the end
    capsys.readouterr()
    assert main(argv) == 0
    said = capsys.readouterr().err
    done, skipped = (int(said.split(f" {word}")[0].rsplit(" ", 1)[-1]) for word in ("done", "skipped"))
    assert 2 <= skipped < 40 and done == 40 - skipped, said  # it resumed: it did not start over
    rows = read_rows(out)
    assert len({row["id"] for row in rows}) == len(rows) == 40
    assert rows == read_rows(expected.out)
    assert not (tmp_path / "rows.jsonl.parts").exists()


def test_a_torn_last_line_is_cut_before_the_run_goes_on(data, vlm, reference, tmp_path):
    """What a kill in the middle of a write (or a power cut) can leave: a journal ending mid-row."""
    out = tmp_path / "rows.jsonl"
    parts = tmp_path / "rows.jsonl.parts"
    parts.mkdir()
    whole = "".join(json.dumps(row) + "\n" for row in reference["rows"][:3])
    (parts / "rows-0.jsonl").write_text(whole + json.dumps(reference["rows"][3])[:50])
    summary = batch_infer([data["photos"], data["manifest"]], out, model=vlm)
    assert (summary.done, summary.skipped) == (5, 3)
    assert read_rows(out) == reference["rows"]


# ---- WebDataset shards and Parquet, in and out ----


def test_webdataset_shards_and_parquet_in_and_out(data, vlm, reference, tmp_path, capsys):
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, path in enumerate(data["photo_paths"][:3]):
            add_member(tar, f"sample{i}.png", path.read_bytes())
            add_member(tar, f"sample{i}.json", json.dumps({"license": "cc0", "n": i}).encode())
        add_member(tar, "sample9.png", b"broken")
    rows = [{"id": "a", "path": str(data["listed"][0]), "query": MANIFEST_QUERY, "split": "val"}]
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    out = tmp_path / "rows.parquet"
    summary = batch_infer([str(tmp_path / "shard-*.tar"), manifest], out, model=vlm, ground=True)
    assert (summary.done, summary.failed) == (4, 1)
    got = pq.read_table(out).to_pylist()
    assert [row["id"] for row in got] == ["sample0", "sample1", "sample2", "a"]
    assert got[0]["image"] == f"{shard.as_posix()}#sample0.png"
    assert (got[1]["license"], got[1]["n"], got[3]["split"]) == ("cc0", 1, "val")
    assert read_rows(summary.errors)[0]["id"] == "sample9"
    # grounded captions: the rows hold what `cogvlm caption` says, boxes in pixels of each image
    capsys.readouterr()
    assert main(["caption", *map(str, data["photo_paths"][:3]), "--json", "--device", "cpu"]) == 0
    captions = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for row, caption in zip(got, captions):
        assert (row["answer"], row["boxes"]) == (caption["answer"], caption["boxes"])
        assert row["generation"]["template"] == "base"
    assert any(row["boxes"] for row in got)
    assert got[0]["width"] == 160 and got[1]["width"] == 112


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# ---- inputs ----


def test_inputs_list_folders_recursively_with_ids_relative_to_the_folder(data):
    items = collect([data["photos"], data["photo_paths"][0]])
    assert [i.id for i in items[:3]] == ["broken.png", "scene00.png", "scene02.png"]
    assert items[-1].id == data["photo_paths"][0].as_posix()  # a file given directly: its path as given
    assert {i.id for i in items} >= {"deep/cut.png", "deep/scene01.png"}


def test_manifests_read_paths_from_their_folder_and_refuse_clashing_columns(tmp_path):
    (tmp_path / "m.csv").write_text("file_name,caption\nx/a.png,a cat\n")
    (item,) = collect([tmp_path / "m.csv"])
    assert (item.id, item.path, item.extra) == ("x/a.png", str(tmp_path / "x/a.png"), {"caption": "a cat"})
    (item,) = collect([tmp_path / "m.csv"], Columns(image="file_name", id="caption"))
    assert item.id == "a cat"
    (tmp_path / "clash.jsonl").write_text(json.dumps({"image": "a.png", "answer": "gold"}) + "\n")
    with pytest.raises(CogVLMError, match="answer would overwrite"):
        collect([tmp_path / "clash.jsonl"])
    (tmp_path / "noimage.jsonl").write_text(json.dumps({"picture": "a.png"}) + "\n")
    with pytest.raises(CogVLMError, match="no image column"):
        collect([tmp_path / "noimage.jsonl"])


def test_inputs_that_cannot_be_used_stop_before_anything_runs(data, tmp_path):
    with pytest.raises(CogVLMError, match="given twice"):
        collect([data["photos"], data["photos"]])
    with pytest.raises(CogVLMError, match="no such file or folder"):
        collect([tmp_path / "nothing"])
    with pytest.raises(CogVLMError, match="no file matches"):
        collect([str(tmp_path / "*.tar")])


def test_remote_images_need_the_opt_in_and_then_a_public_address():
    url = Item(id="u", image="http://127.0.0.1:9/a.png")
    refused = prepare(url, 112)
    assert isinstance(refused, Failure) and "--allow-remote-images" in refused.reason
    private = prepare(url, 112, allow_remote=True)
    assert isinstance(private, Failure) and "not a public address" in private.reason
    png = io.BytesIO()
    Image.new("RGB", (3, 2), "red").save(png, format="PNG")
    inline = prepare(Item(id="d", image="data:image/png;base64," + base64.b64encode(png.getvalue()).decode()), 112)
    assert isinstance(inline, Prepared) and inline.image.size == (112, 112) and (inline.width, inline.height) == (3, 2)


# ---- output store and shards ----


def test_journals_skip_a_torn_line_and_cut_it_before_appending(tmp_path):
    path = tmp_path / "rows-0.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b"')
    assert read_journal(path) == ([{"id": "a"}], 12)
    journal = Journal(path)
    journal.append([{"id": "c"}])
    journal.close()
    assert path.read_bytes() == b'{"id": "a"}\n{"id": "c"}\n'


def test_the_merge_orders_rows_as_the_inputs_and_keeps_failures_not_since_answered(tmp_path):
    store = OutputStore(tmp_path / "out.jsonl")
    rows, errors = store.journals(0)
    rows.append([{"id": "b"}, {"id": "old"}])
    errors.append([{"id": "a", "error": "x"}, {"id": "b", "error": "y"}])
    rows.close(), errors.close()
    more, _ = store.journals(1)
    more.append([{"id": "c"}, {"id": "b"}])
    more.close()
    assert store.done_ids() == {"b", "c", "old"}
    assert store.merge(["a", "b", "c"]) == 1
    assert read_rows(store.out) == [{"id": "b"}, {"id": "c"}, {"id": "old"}]
    assert read_rows(store.errors) == [{"id": "a", "error": "x"}]
    assert not store.parts.exists()
    with pytest.raises(CogVLMError, match="use a .jsonl or .parquet"):
        OutputStore(tmp_path / "out.txt")


def test_shards_split_ids_once_each_whatever_the_process(tmp_path):
    ids = [f"img{i}.png" for i in range(200)]
    for world in (1, 2, 3, 8):
        owners = [shard_of(i, world) for i in ids]
        assert set(owners) == set(range(world))
    code = "from cogvlm.batch.shard import shard_of; print([shard_of(f'img{i}.png', 3) for i in range(200)])"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # another process, other str hashes
    there = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert there.stdout == f"{[shard_of(i, 3) for i in ids]}\n"


# ---- the command's errors: one line, exit 2, before any model is loaded ----


@pytest.mark.parametrize(
    "argv, message",
    [
        (["batch", "NOWHERE", "--out", "o.jsonl"], "NOWHERE: no such file or folder"),
        (["batch", "PHOTOS", "--out", "o.txt"], "use a .jsonl or .parquet file"),
        (["batch", "--ray", "PHOTOS", "PHOTOS", "--out", "o.jsonl"], "put --ray after the inputs"),
        (["batch", "PHOTOS", "--out", "o.jsonl", "--batch-size", "0"], "batch_size must be >= 1"),
        (["batch", "PHOTOS", "--out", "o.jsonl", "--query", "q", "--ground"], "not allowed with argument"),
    ],
)
def test_the_command_says_what_is_wrong_in_one_line(data, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    argv = [str(data["photos"]) if a == "PHOTOS" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
