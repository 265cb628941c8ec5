"""The loading layer tells the truth: each failure is one line naming its real cause (a device
this torch lacks, a map that leaves modules out, out of memory, a missing extra), a quantised
folder is never loaded as another method, and generation_config.json sets the defaults."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cogvlm
from cogvlm import loading
from cogvlm.config import PRESETS
from cogvlm.errors import CogVLMError, SettingsError
from cogvlm.loading import LoadOptions, generation_defaults
from cogvlm.loading import placement as placement_module
from cogvlm.loading.placement import choose_setting

GiB = 2**30


def _one_line_error(excinfo, *needles: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def _cogvlm(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cogvlm.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only torch build")
def test_cuda_on_a_cpu_only_torch_says_so(reference_dir):
    with pytest.raises(SettingsError) as e:
        cogvlm.CogVLMForCausalLM.from_pretrained(reference_dir, device="cuda")
    _one_line_error(e, "CPU-only build", "--device cpu")
    proc = _cogvlm(
        "ask", str(reference_dir / "images" / "img0.png"), "-q", "hi", "--model", str(reference_dir), "--device", "cuda"
    )
    assert proc.returncode == 2
    assert "CPU-only build" in proc.stderr and "corrupt" not in proc.stderr and "Traceback" not in proc.stderr


def test_missing_gpu_index_is_named(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SettingsError) as e:
        placement_module.check_device("cuda:3")
    _one_line_error(e, "cuda:3 does not exist", "2 GPU(s)")


def test_device_map_that_leaves_modules_out(reference_dir):
    device_map = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu"}
    with pytest.raises(SettingsError) as e:
        cogvlm.CogVLMForCausalLM.from_pretrained(reference_dir, device_map=device_map)
    message = _one_line_error(e, "places no device", "lm_head", "model.vision")
    assert "corrupt" not in message


def test_out_of_memory_says_what_was_needed(reference_dir, monkeypatch):
    def out_of_memory(*args, **kwargs):  # the first weight placed runs out of memory
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
        yield

    monkeypatch.setattr(placement_module, "iter_tensors", out_of_memory)
    with pytest.raises(SettingsError) as e:
        cogvlm.CogVLMForCausalLM.from_pretrained(reference_dir)
    message = _one_line_error(e, "out of memory", "GiB", "--quantize")
    assert "corrupt" not in message


def test_corrupt_file_is_still_called_corrupt(reference_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(reference_dir, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CogVLMError) as e:
        cogvlm.CogVLMForCausalLM.from_pretrained(folder)
    _one_line_error(e, "model.safetensors", "corrupt or truncated")


def test_automatic_choice_keeps_a_saved_quantisation():
    config = PRESETS["cogvlm-chat-17b"]
    setting, message = choose_setting(config, {0: 80 * GiB, "cpu": 64 * GiB}, saved="int8")
    assert setting["quantize"] == "int8" and setting["device"] == "cuda:0" and "as saved" in message
    setting, _ = choose_setting(config, {0: 16 * GiB, 1: 16 * GiB, "cpu": 64 * GiB}, saved="int8")
    assert setting["quantize"] == "int8" and setting["device_map"] == "auto"
    setting, _ = choose_setting(config, {0: 4 * GiB, "cpu": 64 * GiB}, saved="int8")
    assert setting == {
        "device": "cpu",
        "device_map": None,
        "max_memory": None,
        "quantize": "int8",
        "quantize_vision": False,
    }


def test_device_auto_on_a_gpu_machine_reads_the_folders_quantisation(reference_dir, tmp_path, monkeypatch):
    """With --device auto on a (simulated) GPU, a saved int8 folder is placed as int8, never requantised."""
    from cogvlm.loading.save_quantized import quantize_checkpoint

    out = tmp_path / "int8"
    quantize_checkpoint(reference_dir, out, "int8")
    shutil.copy(reference_dir / "tokenizer.model", out)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(loading, "free_memory", lambda: {0: 1 * GiB, "cpu": 8 * GiB})
    calls = []
    monkeypatch.setattr(loading, "load_model", lambda *a, **kw: calls.append(kw) or torch.nn.Linear(1, 1))
    loading.load(LoadOptions(model=out, device="auto"))
    assert calls[0]["quantize"] == "int8" and calls[0]["device"] == "cuda:0"


def test_quantised_folder_is_not_loaded_as_another_method(reference_dir, tmp_path):
    from cogvlm.loading.save_quantized import quantize_checkpoint

    quantize_checkpoint(reference_dir, tmp_path / "int8", "int8")
    with pytest.raises(SettingsError) as e:
        cogvlm.CogVLMForCausalLM.from_pretrained(tmp_path / "int8", quantize="int4")
    _one_line_error(e, "quantised with int8, not int4")


def test_missing_extra_is_one_line_naming_the_install(tmp_path):
    """`cogvlm train` without peft / `cogvlm quantize` without torchao: exit 2 and the pip line."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nfor name in ('peft', 'torchao'):\n    sys.modules[name] = None\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    proc = _cogvlm("train", "merge", str(tmp_path / "lora-checkpoint"), str(tmp_path / "merged"), env=env)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'cogvlm[train]'" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = _cogvlm(
        "quantize",
        str(Path(__file__).parent / "fixtures" / "reference-tiny"),
        str(tmp_path / "q"),
        "--method",
        "int8",
        env=env,
    )
    assert proc.returncode == 2 and "pip install 'cogvlm[quant]'" in proc.stderr, proc.stderr


def test_generation_config_sets_the_defaults(reference_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(reference_dir, folder)
    assert generation_defaults(folder) == {}  # the official CogVLM-1 file holds only token ids
    (folder / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_length": 23})
    )
    # as transformers: what the file sets wins, its own defaults fill the rest (top_k 50)
    assert generation_defaults(folder) == {
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": 50,
        "repetition_penalty": 1.0,
        "max_length": 23,
    }
    vlm = cogvlm.load(folder, device="cpu")
    assert vlm.generation.do_sample and vlm.generation.temperature == 0.6 and vlm.context_length == 23
    image = reference_dir / "images" / "img0.png"
    seeded = [vlm.chat("Describe the image.", image, seed=s) for s in (1, 1, 2, 3)]
    assert seeded[0] == seeded[1] and len(set(seeded)) > 1  # sampling is on by default now
    # max_length caps prompt (15 tokens here) + answer; greedy is one setting away
    plain = cogvlm.load(reference_dir, device="cpu")
    assert len(plain.build("Describe the image.", image)["input_ids"]) == 15
    assert vlm.chat("Describe the image.", image, do_sample=False) == plain.chat(
        "Describe the image.", image, max_new_tokens=8
    )


def test_loading_and_answering_never_import_the_compiler():
    """Building the model on the meta device skips the modules' random init (`model.on_meta`): the
    meta device's `normal_` imports torch._dynamo, which took 2.5 of `cogvlm ask`'s 5.4 s on the
    shipped model. Loading it and answering one question must not import it."""
    script = (
        "import sys, cogvlm; vlm = cogvlm.load(device='cpu'); "
        "vlm.chat('What color is the star?', image='examples/scene.png', max_new_tokens=4); "
        "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo'))[:3])"
    )
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_a_model_built_on_meta_has_every_weight_and_no_memory():
    from cogvlm.model import CogVLMForCausalLM, on_meta

    config = PRESETS["tiny"]
    meta = on_meta(CogVLMForCausalLM, config)
    real = CogVLMForCausalLM(config)
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
    assert all(p.device.type == "meta" for p in meta.parameters())
