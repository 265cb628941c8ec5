"""`cogvlm bench`: which model it measures and which figures it reports (no timing is asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from safetensors import safe_open

from cogvlm.cli import main
from conftest import REFERENCE

COGVLM2 = REFERENCE.parent / "reference-cogvlm2-tiny"  # a checkpoint of another size than the tiny preset


def stored_weight_mb(folder) -> float:
    """The checkpoint's tensor bytes, read from the file's own header (not through cogvlm)."""
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) * 4 for k in f.keys()) / 1e6  # fp32


def bench(tmp_path, *argv: str) -> dict:
    out = tmp_path / "figures.json"
    assert main(["bench", "--new-tokens", "3", "--out", str(out), *argv]) == 0
    return json.loads(out.read_text())


def test_bench_measures_the_named_checkpoint_at_each_batch_size(tmp_path):
    figures = bench(tmp_path, "--model", str(COGVLM2), "--batch", "2,3")
    assert figures["model"] == str(COGVLM2)
    assert figures["weight_MB"] == pytest.approx(stored_weight_mb(COGVLM2), abs=0.1)
    for key in ("ttft_s", "decode_tok_s_b1", "decode_tok_s_b2", "decode_tok_s_b3", "speedup_b3_over_b1"):
        assert figures[key] > 0, key
    assert figures["kv_cache_MB_b3"] == pytest.approx(3 * figures["kv_cache_MB_b1"], abs=0.15)
    assert not any(key.endswith("_graphs") for key in figures)  # CUDA graphs only when asked for, on CUDA


def test_bench_without_a_model_times_the_presets_random_weights(tmp_path):
    figures = bench(tmp_path, "--preset", "tiny", "--batch", "2")
    assert figures["model"] == "tiny" and "decode_tok_s_b2" in figures
    assert figures["weight_MB"] == pytest.approx(stored_weight_mb(REFERENCE), abs=0.1)  # the preset's geometry
    assert figures["weight_MB"] != pytest.approx(stored_weight_mb(COGVLM2), abs=0.1)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cuda-graphs", "on"], "CUDA graphs need a CUDA device (got cpu)"),
        (["--batch", "0"], "sizes must be >= 1"),
        (["--batch", "8,x"], "expected sizes like 8 or 1,8,32"),
        (["--model", "no/such-model"], "no/such-model"),
    ],
)
def test_bench_refuses_bad_arguments_in_one_line(argv, message):
    run = subprocess.run(
        [sys.executable, "-m", "cogvlm.cli", "bench", *argv], capture_output=True, text=True, timeout=120
    )
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
