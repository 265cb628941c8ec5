"""CogVLM2 through every way in: the commands (ask, chat, caption, eval, quantize, info), the server
and its web page, the official device-map recipe, a hub id, and the drop-in `generate` with the
folder's generation defaults, on the official fixture `reference-cogvlm2-tiny`.

Expectations come from the fixture (the official code's greedy answers, logits and sequences) or
from transformers itself (its sampling warpers), never from the code under test; where only "runs
and agrees with the Pipeline" can be checked, the test says so.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import httpx
import openai
import pytest
import torch
from PIL import Image

import cogvlm
from cogvlm import CogVLMForCausalLM
from cogvlm.cli import main
from cogvlm.generation import KVCache
from cogvlm.pipeline import Pipeline
from cogvlm.prompts import GROUNDED_CAPTION
from cogvlm.serve import ServeSettings, create_app, running

PAD = 128002  # pad id and image placeholder
EOT = 128009  # <|eot_id|>: the second eos id, the one that ends a chat turn
#: The released CogVLM2 generation_config.json (reference-spec-cogvlm2.md): it samples.
RELEASED_GENERATION = {
    "bos_token_id": 128000,
    "do_sample": True,
    "eos_token_id": [128001, 128009],
    "max_length": 4096,
    "pad_token_id": 128002,
    "temperature": 0.6,
    "top_p": 0.9,
}


def _case(tensors: dict[str, torch.Tensor], name: str) -> tuple[dict, dict]:
    """A fixture case's tensors, and its model inputs (images as the official per-sample lists)."""
    t = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(name + ".")}
    images = None
    if "images" in t:
        it = iter(t["images"])
        images = [[next(it)] if n else [] for n in t["images_per_sample"].tolist()]
    inputs = {k: t[k] for k in ("input_ids", "token_type_ids", "attention_mask")} | {"images": images}
    return t, inputs


@pytest.fixture(scope="module")
def sampling_dir(cogvlm2_dir, tmp_path_factory) -> Path:
    """The fixture with the released generation_config.json (do_sample, temperature 0.6, top_p 0.9);
    every other file is a link to the fixture's."""
    folder = tmp_path_factory.mktemp("cogvlm2-sampling")
    for path in cogvlm2_dir.iterdir():
        if path.name != "generation_config.json":
            (folder / path.name).symlink_to(path)
    (folder / "generation_config.json").write_text(json.dumps(RELEASED_GENERATION, indent=2))
    return folder


@pytest.fixture(scope="module")
def vlm(cogvlm2_dir):
    return cogvlm.load(cogvlm2_dir, device="cpu")


@pytest.fixture(scope="module")
def img0(cogvlm2_dir) -> str:
    return str(cogvlm2_dir / "images" / "img0.png")


# ---- the commands ---------------------------------------------------------------------------


def test_ask_answers_as_the_official_code(cogvlm2_dir, cogvlm2_cases, img0, capsys):
    args = ["ask", img0, "-q", "Describe this image.", "--model", str(cogvlm2_dir), "--max-new-tokens", "8"]
    assert main([*args, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["answer"] == cogvlm2_cases["chat_img"]["decoded_new"][0]  # the official greedy 8 tokens


def test_greedy_is_one_flag_away_from_the_folders_sampling(sampling_dir, cogvlm2_cases, img0, capsys):
    """The released generation_config.json samples: answers change with the seed; --greedy gives
    the official greedy answer."""
    args = ["ask", img0, "-q", "Describe this image.", "--model", str(sampling_dir), "--max-new-tokens", "8", "--json"]
    answers = []
    for extra in (["--seed", "1"], ["--seed", "1"], ["--seed", "2"], ["--greedy", "--seed", "1"]):
        assert main([*args, *extra]) == 0
        answers.append(json.loads(capsys.readouterr().out)["answer"])
    assert answers[0] == answers[1] != answers[2]
    assert answers[3] == cogvlm2_cases["chat_img"]["decoded_new"][0] != answers[0]


def test_chat_over_stdin_keeps_the_history(cogvlm2_dir, cogvlm2_cases, vlm, monkeypatch, capsys):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("What is a cat?\nIs the sky blue?\n"))
    assert main(["chat", "--model", str(cogvlm2_dir), "--max-new-tokens", "8"]) == 0
    answers = re.findall(r"CogVLM: (.*)\n", capsys.readouterr().out)  # after "User: " when input() echoes it
    first = cogvlm2_cases["chat_text"]["decoded_new"][0]  # the official greedy answer, text only
    assert answers == [
        first,
        vlm.chat("Is the sky blue?", history=[("What is a cat?", first)], max_new_tokens=8),
    ]


def test_caption_uses_the_grounding_prompt(cogvlm2_dir, img0, vlm, capsys):
    """Runs on CogVLM2 and agrees with the Pipeline (the random model writes no boxes)."""
    assert main(["caption", img0, "--model", str(cogvlm2_dir), "--max-new-tokens", "8", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["query"] == GROUNDED_CAPTION
    assert record["answer"] == vlm.chat(GROUNDED_CAPTION, img0, template_version="base", max_new_tokens=8)


def test_eval_shapes(cogvlm2_dir, tmp_path):
    """`python -m cogvlm.cli eval shapes --model FOLDER --n 1`, in this process (the same argv)."""
    assert main(["eval", "shapes", "--model", str(cogvlm2_dir), "--n", "1", "--out", str(tmp_path)]) == 0
    (results,) = tmp_path.glob("*.results.json")
    record = json.loads(results.read_text())
    assert record["model"] == str(cogvlm2_dir) and record["counts"]["scored"] == len(record["per_type"]) >= 8


def test_quantize_int8_folder_loads_and_answers(cogvlm2_dir, cogvlm2_tensors, tmp_path):
    pytest.importorskip("torchao")
    out = tmp_path / "int8"
    assert main(["quantize", str(cogvlm2_dir), str(out), "--method", "int8"]) == 0
    assert json.loads((out / "config.json").read_text())["bos_token_id"] == 128000  # still CogVLM2
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [128001, 128009]
    model = CogVLMForCausalLM.from_pretrained(out)
    t, inputs = _case(cogvlm2_tensors, "chat_img_hist")
    with torch.no_grad():
        got = model(**inputs).logits[:, -1]
    assert (got - t["logits_last"]).abs().max() < 0.05  # int8 weights: close to the official fp32 logits
    answer = cogvlm.load(out, device="cpu").chat(
        "Describe this image.", cogvlm2_dir / "images" / "img0.png", max_new_tokens=8
    )
    assert isinstance(answer, str) and answer


def test_info_presets(capsys):
    """Both 19B presets: 19.503 B parameters, which is the released index's total_size / 2 less the
    rotary inv_freq buffers it stores (32 layers x 64, not parameters); memory per dtype."""
    expected = 39_006_214_656 // 2 - 32 * 64  # reference-spec-cogvlm2.md
    for preset in ("cogvlm2-llama3-chat-19b", "cogvlm2-llama3-chinese-chat-19b"):
        assert main(["info", preset]) == 0
        text = capsys.readouterr().out
        assert text.startswith("CogVLM2") and f"({expected:,})" in text
        assert "2306 (grid + boi + eoi)" in text and "32 heads (8 key/value)" in text
        for line in ("bf16     36.3 GiB", "int8     18.2 GiB", "int4     9.08 GiB"):
            assert line in text
        assert main(["info", preset, "--device-map", "auto", "--max-memory", "0=24GiB,1=24GiB"]) == 0
        plan = capsys.readouterr().out
        per_gpu = {int(d): float(gib) for d, gib in re.findall(r"^\s+([01])\s+([\d.]+)\s", plan, re.M)}
        assert set(per_gpu) == {0, 1} and all(gib <= 24 for gib in per_gpu.values()), plan
        assert sum(per_gpu.values()) == pytest.approx(36.33, abs=0.01)  # all of the bf16 weights
        assert "no offload" in plan and "CogVLMDecoderLayer, TransformerLayer kept whole" in plan


def test_saved_without_a_source_folder_writes_the_official_generation_config(cogvlm2_dir, tmp_path):
    """A CogVLM2 built in memory (no folder to copy from) saves the generation_config.json the
    official code writes: both eos ids, so every loader stops at <|eot_id|> too."""
    config = cogvlm.CogVLMConfig.from_json(cogvlm2_dir / "config.json")
    with torch.device("meta"):
        model = CogVLMForCausalLM(config)
    model = model.to_empty(device="cpu")
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "generation_config.json").read_text())
    assert written == json.loads((cogvlm2_dir / "generation_config.json").read_text())
    assert written["eos_token_id"] == [128001, 128009]


def test_bench_counts_the_kv_cache_the_engine_allocates(cogvlm2_model):
    """bench's roofline and KV figures count the KV heads only (half the width in the fixture,
    a quarter in the 19B and the bench preset)."""
    from cogvlm.bench import _kv_bytes

    cache = KVCache(cogvlm2_model, 3, 10)
    allocated = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in cache.layers)
    assert _kv_bytes(cogvlm2_model, 10, 3) == allocated


# ---- the server -----------------------------------------------------------------------------


class EndsTurnAfter:
    """The model, with <|eot_id|> made the top logit at the `n`-th decode step (the first token
    comes from the prefill): a chat model ending its turn."""

    def __init__(self, model, n: int) -> None:
        self.inner, self.n, self.decodes = model, n, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, **inputs):
        out = self.inner(**inputs)
        if inputs["input_ids"].shape[1] == 1:
            self.decodes += 1
            if self.decodes == self.n:
                out.logits[:, -1, EOT] = 1e4
        return out


def _user(text: str, image: str | None = None) -> dict:
    import base64

    content = [{"type": "text", "text": text}]
    if image:
        url = "data:image/png;base64," + base64.b64encode(Path(image).read_bytes()).decode()
        content.append({"type": "image_url", "image_url": {"url": url}})
    return {"role": "user", "content": content}


def test_served_answers_and_web_page(sampling_dir, cogvlm2_cases, img0):
    """A request without temperature is greedy (OpenAI's semantics, as our server always had),
    even though this folder's generation_config.json samples."""
    served = cogvlm.load(sampling_dir, device="cpu")
    assert served.generation.do_sample  # the Pipeline samples by default ...
    with running(create_app(served, ServeSettings(model_names=("cogvlm2",)))) as url:
        page = httpx.get(url + "/")
        assert page.status_code == 200 and "<html" in page.text.lower()
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="cogvlm2", max_tokens=8, messages=[_user("Describe this image.", img0)]
        )
        assert reply.choices[0].message.content == cogvlm2_cases["chat_img"]["decoded_new"][0]  # ... the server not
        prompt = len(served.build("Describe this image.", img0)["input_ids"])
        assert reply.usage.prompt_tokens == prompt and prompt == 6 + len(
            served.build("Describe this image.")["input_ids"]
        )
        sampled = [
            client.chat.completions.create(
                model="cogvlm2", max_tokens=8, temperature=0.6, seed=s, messages=[_user("Describe this image.", img0)]
            ).choices[0]
            for s in (1, 1, 2)
        ]
        assert sampled[0].message.content == sampled[1].message.content != sampled[2].message.content


def test_served_answer_stops_at_eot_and_never_shows_it(cogvlm2_model, vlm, img0):
    """<|eot_id|> (128009, the folder's second eos id; the tokenizer's eos is 128001) ends the
    answer with finish_reason 'stop', in plain and streamed replies, and is never sent as text."""
    assert vlm.tokenizer.eos_token_id != EOT
    wanted = vlm.chat("Describe this image.", img0, max_new_tokens=2)  # the two tokens before eot
    for stream in (False, True):
        model = EndsTurnAfter(cogvlm2_model, n=2)
        with running(create_app(Pipeline(model, vlm.tokenizer), ServeSettings(model_names=("cogvlm2",)))) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            request = dict(model="cogvlm2", max_tokens=20, messages=[_user("Describe this image.", img0)])
            if stream:
                chunks = list(client.chat.completions.create(**request, stream=True))
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                reason = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            else:
                choice = client.chat.completions.create(**request).choices[0]
                text, reason = choice.message.content, [choice.finish_reason]
        assert model.decodes == 2, "the answer went on after <|eot_id|>"
        assert text == wanted and "<|eot_id|>" not in text and reason == ["stop"]


# ---- placement and the hub ------------------------------------------------------------------


def test_official_device_map_recipe(cogvlm2_dir, cogvlm2_model, cogvlm2_tensors, tmp_path):
    """The official multi-GPU recipe, unchanged, with a CPU/disk budget instead of GPUs: the same
    logits as no map, and the official greedy sequences."""
    from accelerate import infer_auto_device_map, init_empty_weights, load_checkpoint_and_dispatch
    from accelerate.utils import compute_module_sizes

    config = cogvlm2_model.config
    with init_empty_weights():
        model = CogVLMForCausalLM(config)
    # Room for the embeddings and layer 0, plus what accelerate keeps free for the largest
    # offloaded module (lm_head): the other layer, the ViT and lm_head go to disk.
    sizes = compute_module_sizes(model)
    budget = sizes["model.embed_tokens"] + sizes["lm_head"] + sizes["model.layers.0"] + 4096
    device_map = infer_auto_device_map(
        model, max_memory={"cpu": budget}, no_split_module_classes=["CogVLMDecoderLayer", "TransformerLayer"]
    )
    assert device_map["model.layers.0"] == "cpu" and device_map["model.layers.1"] == "disk"
    assert device_map["model.vision"] == "disk"
    model = load_checkpoint_and_dispatch(
        model, str(cogvlm2_dir), device_map=device_map, offload_folder=str(tmp_path)
    ).eval()
    for name in ("batch_mixed", "chat_img_hist"):
        t, inputs = _case(cogvlm2_tensors, name)
        with torch.no_grad():
            got, want = model(**inputs).logits, cogvlm2_model(**inputs).logits
        real = t["attention_mask"].bool()
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
    t, inputs = _case(cogvlm2_tensors, "batch_mixed")
    assert torch.equal(model.generate(**inputs, max_new_tokens=8, pad_token_id=PAD), t["sequences"])


def test_ask_by_hub_id(cogvlm2_dir, cogvlm2_cases, img0, tmp_path, monkeypatch, capsys):
    """THUDM/cogvlm2-llama3-chat-19B as the hub publishes it (shards + index, remote-code files, its
    own tokenizer; 3 shards, as the fixture's two 33 MB tables allow no 8-way split), downloaded once
    into a hub cache as loading fetches it, then asked offline by hub id."""
    import shutil

    from cogvlm.loading.resolve import resolve_model
    from hubfake import closed_endpoint, hub_with, point_hub, publish_cogvlm

    repo = "THUDM/cogvlm2-llama3-chat-19B"
    files = publish_cogvlm(cogvlm2_dir, tmp_path / "repo", shards=3)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(cogvlm2_dir / name, files / name)
    cache = tmp_path / "cache"
    with hub_with({repo: files}).serve() as endpoint, pytest.MonkeyPatch.context() as mp:
        point_hub(mp, endpoint, cache)
        resolve_model(repo)
    point_hub(monkeypatch, closed_endpoint(), cache, offline=True)
    args = ["ask", img0, "-q", "Describe this image.", "--model", repo, "--max-new-tokens", "8", "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["answer"] == cogvlm2_cases["chat_img"]["decoded_new"][0]


# ---- the drop-in model: the official demo's generate -----------------------------------------


def _demo_inputs(model, tokenizer, case: dict, image_dir: Path) -> dict:
    """The official CogVLM2 demo's inputs for a fixture case (only the import changed)."""
    member = case["members"][0]
    image = Image.open(image_dir / member["image"]).convert("RGB")
    inputs = model.build_conversation_input_ids(
        tokenizer, query=member["query"], history=[tuple(h) for h in member["history"]], images=[image]
    )
    return {
        "input_ids": inputs["input_ids"].unsqueeze(0),
        "token_type_ids": inputs["token_type_ids"].unsqueeze(0),
        "attention_mask": inputs["attention_mask"].unsqueeze(0),
        "images": [[inputs["images"][0].to(model.dtype)]],
    }


def test_dropin_generate_samples_as_transformers_with_the_folders_defaults(
    sampling_dir, cogvlm2_dir, cogvlm2_model, cogvlm2_cases, cogvlm2_tensors
):
    """generate() with the released generation_config.json samples as transformers' generate does:
    temperature 0.6, top-k 50 (transformers' default), top-p 0.9. Every first token drawn is in the
    support transformers' own warpers leave on the official logits (38 of 128256 ids; without
    top-k it would be ~115000); draws are reproducible by seed; do_sample=False is the official
    greedy answer."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    model = CogVLMForCausalLM.from_pretrained(sampling_dir).eval()
    g = model.generation_config
    assert (g.do_sample, g.temperature, g.top_p, g.top_k, g.max_length) == (True, 0.6, 0.9, 50, 4096)
    tokenizer = cogvlm.load_tokenizer(sampling_dir)
    case = cogvlm2_cases["chat_img_hist"]
    inputs = _demo_inputs(model, tokenizer, case, cogvlm2_dir / "images")
    t = cogvlm2_tensors["chat_img_hist.input_ids"].shape[1]

    official = cogvlm2_tensors["chat_img_hist.logits_last"].float()
    for warp in (TemperatureLogitsWarper(0.6), TopKLogitsWarper(50), TopPLogitsWarper(0.9)):
        official = warp(None, official)
    support = set(torch.nonzero(official[0] > -float("inf")).flatten().tolist())

    def first_tokens(model: CogVLMForCausalLM, **kwargs) -> list[int]:
        drawn = []
        for seed in range(8):
            torch.manual_seed(seed)
            drawn.append(int(model.generate(**inputs, max_new_tokens=1, pad_token_id=PAD, **kwargs)[0, t]))
        return drawn

    firsts = first_tokens(model)
    assert set(firsts) <= support and len(set(firsts)) > 1, (firsts, len(support))

    def demo(seed: int, **kwargs) -> torch.Tensor:
        torch.manual_seed(seed)
        return model.generate(**inputs, max_new_tokens=8, pad_token_id=PAD, **kwargs)

    assert torch.equal(demo(0), demo(0)) and not torch.equal(demo(0), demo(1))
    greedy = cogvlm2_tensors["chat_img_hist.sequences"]
    assert torch.equal(demo(0, do_sample=False), greedy) and not torch.equal(demo(0), greedy)
    assert tokenizer.decode(demo(0, do_sample=False)[0, t:]) == case["decoded_new"][0]

    # The fixture's own file (token ids only) keeps transformers' defaults: greedy, max_length 20,
    # and top-k 50 when a call turns sampling on.
    plain = cogvlm2_model  # from_pretrained(the fixture)
    assert not plain.generation_config.do_sample
    assert torch.equal(plain.generate(**inputs, max_new_tokens=8, pad_token_id=PAD), greedy)
    firsts = first_tokens(plain, do_sample=True, temperature=0.6, top_p=0.9)
    assert set(firsts) <= support and len(set(firsts)) > 1, (firsts, len(support))
    assert plain.generate(input_ids=inputs["input_ids"][:, :5], eos_token_id=[]).shape[1] == 20
