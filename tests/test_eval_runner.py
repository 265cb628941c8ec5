"""The runner: predictions appended as they come, resume after an interruption (finished questions
are not asked again, final scores equal an uninterrupted run), result files, the summary table
with the paper's numbers, and the `cogvlm eval` command."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from PIL import Image

import cogvlm.cli.eval
from cogvlm.cli import main
from cogvlm.errors import CogVLMError
from cogvlm.eval import Item, get_task, load_items, predict, run, summary_table


def cli_main(argv: list[str]) -> int:
    return main(["eval", *argv])


GQA_ANSWERS = ["yes", "no", "left", "red", "two", "yes", "cat"]


@pytest.fixture
def gqa_dir(tmp_path: Path) -> Path:
    """A 7-question GQA test-dev folder in the official layout."""
    data = tmp_path / "gqa"
    (data / "images").mkdir(parents=True)
    questions = {}
    for k, answer in enumerate(GQA_ANSWERS):
        questions[f"q{k}"] = {
            "imageId": f"img{k}",
            "question": f"question {k}?",
            "answer": answer,
            "types": {"structural": "verify" if answer in ("yes", "no") else "query"},
        }
        Image.new("RGB", (8, 8)).save(data / "images" / f"img{k}.jpg")
    (data / "testdev_balanced_questions.json").write_text(json.dumps(questions))
    return data


class FakePipeline:
    """Answers question k with the right answer when k is even, else "wrong"; records what it is
    asked and with which generation settings, and can stop (like Ctrl-C) before a given call."""

    def __init__(self, interrupt_at_call: int | None = None) -> None:
        self.asked: list[str] = []
        self.settings: list[dict] = []
        self.calls = 0
        self.interrupt_at_call = interrupt_at_call

    def batch(self, requests, **gen):
        self.calls += 1
        self.settings.append(gen)
        if self.calls == self.interrupt_at_call:
            raise KeyboardInterrupt
        answers = []
        for r in requests:
            k = int(r["query"].split()[1].rstrip("?"))
            self.asked.append(f"q{k}")
            answers.append(GQA_ANSWERS[k] + "." if k % 2 == 0 else "wrong")
        return answers


def _run(data: Path, out: Path, pipeline, limit: int | None = None, model: str = "fake", num_beams: int = 1) -> dict:
    task = dataclasses.replace(get_task("gqa"), num_beams=num_beams)
    items, _ = load_items(task, data, "testdev_balanced", limit)
    return run(task, items, pipeline, split="testdev_balanced", model=model, out=out, batch_size=2, progress=False)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _comparable(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "seconds"}


def test_a_run_writes_predictions_results_submission_and_summary(gqa_dir, tmp_path):
    out = tmp_path / "out"
    result = _run(gqa_dir, out, FakePipeline())
    assert result["scores"] == {"accuracy": pytest.approx(4 / 7)}  # q0, q2, q4, q6 right
    assert result["per_type"] == {"verify": pytest.approx(1 / 3), "query": pytest.approx(3 / 4)}  # q0; q2, q4, q6
    assert result["counts"] == {
        "questions": 7,
        "scored": 7,
        "per_type": {"verify": 3, "query": 4},
        "skipped_missing_images": 0,
    }
    assert {"task", "split", "model", "prompt", "template", "max_new_tokens", "metric", "seconds"} <= set(result)
    assert json.loads((out / "gqa-testdev_balanced.results.json").read_text()) == result
    lines = _lines(out / "gqa-testdev_balanced.predictions.jsonl")
    assert lines[0] == {
        "settings": {
            "task": "gqa",
            "split": "testdev_balanced",
            "model": "fake",
            "template": "vqa",
            "prompt": "{question}",
            "max_new_tokens": 16,
        }
    }
    assert lines[1] == {"id": "q0", "answer": "yes", "raw": "yes."}
    submission = json.loads((out / "gqa-testdev_balanced.submission.json").read_text())
    assert submission[1] == {"questionId": "q1", "prediction": "wrong"}
    assert "| gqa | testdev_balanced | fake | accuracy | 57.14 |" in (out / "summary.md").read_text()
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary file


def test_each_answer_is_on_disk_before_the_next_batch(gqa_dir, tmp_path):
    out = tmp_path / "out"
    log = out / "gqa-testdev_balanced.predictions.jsonl"
    seen = []

    class Watcher(FakePipeline):
        def batch(self, requests, **gen):
            seen.append(len(_lines(log)) - 1)  # answers logged before this call
            return super().batch(requests, **gen)

    _run(gqa_dir, out, Watcher())
    assert seen == [0, 2, 4, 6]


def test_questions_about_one_image_are_asked_together():
    """A pipeline computes the [BOS, image] prefix once for the rows of a batch that share it, so
    the runner batches questions by image (first appearance first) within each max_new_tokens;
    every answer still lands on its own question."""
    images = ["a.jpg", "b.jpg", "a.jpg", "c.jpg", "b.jpg", "a.jpg", "a.jpg"]
    items = [Item(id=f"q{k}", image=image, query=f"question {k}?", target=None) for k, image in enumerate(images)]
    items[6] = dataclasses.replace(items[6], max_new_tokens=4)
    calls = []

    class Recorder:
        def batch(self, requests, **gen):
            calls.append(([r["image"] for r in requests], gen["max_new_tokens"]))
            return [f"answer to {r['query']}" for r in requests]

    raw = predict(Recorder(), get_task("gqa"), items, batch_size=3)
    assert calls == [(["a.jpg"] * 3, 16), (["b.jpg", "b.jpg", "c.jpg"], 16), (["a.jpg"], 4)]
    assert raw == {f"q{k}": f"answer to question {k}?" for k in range(7)}


def test_resume_after_interruption_asks_only_the_rest_and_scores_the_same(gqa_dir, tmp_path):
    uninterrupted = _run(gqa_dir, tmp_path / "full", FakePipeline())
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _run(gqa_dir, out, FakePipeline(interrupt_at_call=3))  # two batches of 2 answered
    log = out / "gqa-testdev_balanced.predictions.jsonl"
    with log.open("a") as f:
        f.write('{"id": "q4", "answer": "ye')  # a line torn by the crash
    second = FakePipeline()
    resumed = _run(gqa_dir, out, second)
    assert second.asked == ["q4", "q5", "q6"]
    assert _comparable(resumed) == _comparable(uninterrupted)
    assert [r.get("id") for r in _lines(log)] == [None, "q0", "q1", "q2", "q3", "q4", "q5", "q6"]
    third = FakePipeline()
    assert _comparable(_run(gqa_dir, out, third)) == _comparable(uninterrupted)
    assert third.calls == 0


def test_a_finished_run_is_rescored_without_loading_the_model(gqa_dir, tmp_path):
    first = _run(gqa_dir, tmp_path, FakePipeline())

    def load_model():
        raise AssertionError("the model was loaded although every question is answered")

    assert _comparable(_run(gqa_dir, tmp_path, load_model)) == _comparable(first)
    loaded = []
    _run(gqa_dir, tmp_path / "fresh", lambda: loaded.append(1) or FakePipeline(), limit=2)
    assert loaded == [1]


def test_a_larger_limit_reuses_the_answers_of_a_smaller_one(gqa_dir, tmp_path):
    out = tmp_path / "out"
    assert _run(gqa_dir, out, FakePipeline(), limit=3)["counts"]["questions"] == 3
    second = FakePipeline()
    _run(gqa_dir, out, second, limit=5)
    assert second.asked == ["q3", "q4"]


def test_predictions_of_another_model_are_not_mixed_in(gqa_dir, tmp_path):
    _run(gqa_dir, tmp_path, FakePipeline(), limit=2)
    with pytest.raises(CogVLMError, match=r"predictions of another run \(model: 'fake' != 'other'\)"):
        _run(gqa_dir, tmp_path, FakePipeline(), limit=2, model="other")


def test_beam_and_greedy_predictions_are_not_mixed(gqa_dir, tmp_path):
    """A beam run's file has num_beams in its settings; a greedy run's has no such key. Either rerun
    on the other's file is refused (a key only one run has differs); the same settings resume."""
    log = tmp_path / "gqa-testdev_balanced.predictions.jsonl"
    beams = FakePipeline()
    _run(gqa_dir, tmp_path, beams, limit=2, num_beams=4)
    assert beams.settings == [{"max_new_tokens": 16, "do_sample": False, "num_beams": 4}]
    assert _lines(log)[0]["settings"]["num_beams"] == 4
    with pytest.raises(CogVLMError, match=r"predictions of another run \(num_beams: 4 != absent\)"):
        _run(gqa_dir, tmp_path, FakePipeline(), limit=2)
    resumed = FakePipeline()
    assert _run(gqa_dir, tmp_path, resumed, limit=2, num_beams=4)["num_beams"] == 4 and resumed.calls == 0
    greedy = tmp_path / "greedy"
    _run(gqa_dir, greedy, FakePipeline(), limit=2)
    with pytest.raises(CogVLMError, match=r"predictions of another run \(num_beams: absent != 4\)"):
        _run(gqa_dir, greedy, FakePipeline(), limit=2, num_beams=4)


def test_summary_puts_the_papers_numbers_beside_ours():
    def result(task, split, value, paper):
        return {
            "task": task,
            "split": split,
            "model": "/m/cogvlm-grounding",
            "metric": "Acc@0.5",
            "scores": {"Acc@0.5": value},
            "counts": {"scored": 10},
            "paper": paper,
        }

    refcoco = [
        {"split": "val", "value": 92.76, "note": "grounding-generalist v1.1"},
        {"split": "testA", "value": 94.75, "note": "grounding-generalist v1.1"},
    ]
    vqav2 = [{"split": "test-dev2015", "value": 82.3, "note": ""}]
    table = summary_table([result("refcoco", "testA", 0.9, refcoco), result("vqav2", "val2014", 0.5, vqav2)])
    row = "| refcoco | testA | cogvlm-grounding | Acc@0.5 | 90.00 | 94.75 (grounding-generalist v1.1) | 10 |"
    assert row in table
    assert "| 50.00 | 82.3 (test-dev2015) |" in table  # the paper's split is named when it differs


# ----------------------------------------------------------------------------- the command
def test_cli_runs_a_task_on_the_reference_model(gqa_dir, tmp_path, reference_dir, capsys, one_thread):
    out = tmp_path / "out"
    argv = [
        "gqa",
        "--data",
        str(gqa_dir),
        "--model",
        str(reference_dir),
        "--device",
        "cpu",
        "--limit",
        "3",
        "--batch-size",
        "2",
        "--out",
        str(out),
    ]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("gqa testdev_balanced: accuracy ") and "3 scored of 3 questions" in printed
    result = json.loads((out / "gqa-testdev_balanced.results.json").read_text())
    assert result["model"] == str(reference_dir.resolve())
    # the reference model's random weights answer gibberish: by hand, none of its three answers is
    # the ground truth ("yes", "no", "left") even lowercased and without a trailing period
    answers = [r["answer"] for r in _lines(out / "gqa-testdev_balanced.predictions.jsonl")[1:]]
    assert len(answers) == 3 and not {a.strip().lower().rstrip(".") for a in answers} & {"yes", "no", "left"}
    assert result["scores"] == {"accuracy": 0.0} and result["per_type"] == {"verify": 0.0, "query": 0.0}


def test_cli_shapes_prints_true_and_shuffled_columns(tmp_path, reference_dir, capsys, one_thread):
    argv = [
        "shapes",
        "--model",
        str(reference_dir),
        "--device",
        "cpu",
        "--n",
        "1",
        "--shuffle-images",
        "--out",
        str(tmp_path),
    ]
    assert cli_main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["type", "true", "image", "shuffled", "image"]
    assert [line.split()[0] for line in lines[1:11]] == [
        "color",
        "shape",
        "count",
        "exist",
        "position",
        "relation",
        "caption",
        "ground",
        "ground_caption",
        "overall",
    ]
    assert sorted(p.name for p in tmp_path.glob("*.results.json")) == [
        "shapes-seed999999-n1-shuffled.results.json",
        "shapes-seed999999-n1.results.json",
    ]


def test_cli_num_beams_decodes_with_beams_and_records_them(gqa_dir, tmp_path, monkeypatch, capsys):
    """`--num-beams N` asks the model for N beams, is in the run's settings, and a rerun without it
    does not reuse those answers."""
    pipeline = FakePipeline()
    monkeypatch.setattr(cogvlm.cli.eval, "load_pipeline", lambda args: pipeline)
    out = tmp_path / "out"
    argv = ["gqa", "--data", str(gqa_dir), "--limit", "3", "--batch-size", "2", "--out", str(out)]
    assert cli_main([*argv, "--num-beams", "3"]) == 0
    assert [gen.get("num_beams") for gen in pipeline.settings] == [3, 3]
    assert _lines(out / "gqa-testdev_balanced.predictions.jsonl")[0]["settings"]["num_beams"] == 3
    assert json.loads((out / "gqa-testdev_balanced.results.json").read_text())["num_beams"] == 3
    capsys.readouterr()
    assert cli_main(argv) == 2
    assert "(num_beams: 3 != absent)" in capsys.readouterr().err
    assert cli_main([*argv, "--num-beams", "3"]) == 0 and pipeline.calls == 2  # resumed: nothing asked


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "give a TASK"),
        (["nope"], "unknown task 'nope'"),
        (["gqa"], "gqa needs --data DIR"),
        (["gqa", "--data", "/no/such/folder"], "/no/such/folder: no such folder"),
        (["gqa", "--data", ".", "--limit", "0"], "--limit must be >= 1"),
        (["gqa", "--data", ".", "--num-beams", "0"], "--num-beams must be >= 1 (got 0)"),
        (["shapes", "--num-beams", "-1"], "--num-beams must be >= 1 (got -1)"),
        (["gqa", "--api-base", "http://127.0.0.1:9/v1", "--num-beams", "2"], "answers greedily, drop --num-beams"),
        (["gqa", "--data", ".", "--n", "5"], "--n only apply to the shapes task"),
        (["gqa", "--data", ".", "--seed", "0"], "--seed only apply to the shapes task"),
        (["shapes", "--data", "."], "shapes generates its questions: drop --data"),
        (["gqa", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_cli_user_errors_are_one_line_and_status_2(argv, message, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cogvlm eval: error: ") and message in err


def test_cli_missing_annotation_file_names_it(tmp_path, capsys):
    assert cli_main(["gqa", "--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "testdev_balanced_questions.json: annotation file not found" in capsys.readouterr().err


def test_cli_list(capsys):
    assert cli_main(["--list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names[:3] == ["vqav2", "okvqa", "textvqa"] and "refcoco+" in names and names[-1] == "shapes"
