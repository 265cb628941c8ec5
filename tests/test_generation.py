"""The generation engine and the Pipeline: batching, sampling, stop strings, streaming."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from cogvlm import SettingsError
from cogvlm.generation import BatchDecoder, GenerationConfig, sample
from cogvlm.pipeline import Pipeline
from cogvlm.prompts import collate
from cogvlm.streaming import TextStream


@pytest.fixture(scope="module")
def vlm(reference_model, reference_tokenizer):
    return Pipeline(reference_model, reference_tokenizer, GenerationConfig(max_new_tokens=12))


@pytest.fixture(scope="module")
def images(reference_dir):
    return [Image.open(reference_dir / "images" / f"img{i}.png").convert("RGB") for i in (0, 1)]


def test_batch_equals_alone(vlm, images):
    requests = [
        {"query": "Describe this image.", "image": images[0]},
        {"query": "What color is the star?", "image": images[1], "template_version": "vqa"},
        {
            "query": "Where is the dog?",
            "image": images[0],
            "history": [("What is in the image?", "a red cat."), ("Is there a blue box?", "yes")],
        },
        {"query": "What is a cat?"},  # text only, in the same batch as image requests
        {"query": "A picture of", "image": images[1], "template_version": "base"},
    ]
    batched = vlm.batch(requests)
    alone = [vlm.batch([r])[0] for r in requests]
    assert batched == alone
    assert len(set(batched)) > 1


def test_finished_rows_leave_the_batch(reference_model, reference_tokenizer):
    rows = [reference_tokenizer.encode("Question: hi Answer:", add_special_tokens=True)] * 3
    data = collate(
        [
            {
                "input_ids": torch.tensor(r),
                "token_type_ids": torch.zeros(len(r), dtype=torch.long),
                "attention_mask": torch.ones(len(r), dtype=torch.long),
                "images": None,
            }
            for r in rows
        ]
    )
    configs = [GenerationConfig(max_new_tokens=n) for n in (2, 5, 9)]
    decoder = BatchDecoder(reference_model, data, configs, eos_token_id=None)
    sizes = [len(step) for step in decoder]
    assert sizes == [3, 3, 2, 2, 2, 1, 1, 1, 1]
    assert [len(t) for t in decoder.tokens] == [2, 5, 9]


def test_stream_equals_the_non_streaming_path(vlm, images):
    """Streamed pieces join to what the drop-in `generate` (a separate decode loop) gives, decoded once."""
    for kwargs in ({"image": images[0]}, {}, {"image": images[1], "template_version": "vqa"}):
        pieces = list(vlm.stream("Describe this image.", **kwargs))
        batch = collate([vlm.build("Describe this image.", **kwargs)])
        prompt = batch["input_ids"].shape[1]
        out = vlm.model.generate(**batch, max_new_tokens=12, eos_token_id=vlm.tokenizer.eos_token_id)
        new = out[0, prompt:].tolist()
        new = new[: new.index(vlm.tokenizer.eos_token_id)] if vlm.tokenizer.eos_token_id in new else new
        assert "".join(pieces) == vlm.tokenizer.decode(new)
        assert len(pieces) > 1


def test_sampling_reproducible_with_seed(vlm, images):
    kwargs = dict(image=images[0], do_sample=True, temperature=1.5, top_p=0.9, top_k=50)
    first = vlm.chat("Describe this image.", seed=7, **kwargs)
    assert vlm.chat("Describe this image.", seed=7, **kwargs) == first
    others = {vlm.chat("Describe this image.", seed=s, **kwargs) for s in range(8, 13)}
    assert others - {first}
    assert first != vlm.chat("Describe this image.", image=images[0])  # not the greedy answer


def test_seeded_sampling_is_isolated_in_a_batch(vlm, images):
    request = {"query": "Describe this image.", "image": images[0]}
    alone = vlm.batch([request], do_sample=True, temperature=1.3, seed=3)
    together = vlm.batch([request, {"query": "What is a cat?"}], do_sample=True, temperature=1.3, seed=3)
    assert together[0] == alone[0]


def test_stop_strings(vlm, images):
    full = vlm.chat("Describe this image.", image=images[1])
    stop = full[3:6]
    cut = vlm.chat("Describe this image.", image=images[1], stop=[stop])
    assert cut == full[: full.index(stop)]
    pieces = list(vlm.stream("Describe this image.", image=images[1], stop=stop))
    assert "".join(pieces) == cut


def test_max_new_tokens_and_eos(reference_model, reference_tokenizer):
    ids = torch.tensor([reference_tokenizer.encode("Question: hi Answer:", add_special_tokens=True)])
    out = reference_model.generate(input_ids=ids, max_new_tokens=5)
    assert out.shape == (1, ids.shape[1] + 5)
    first = int(out[0, ids.shape[1]])
    stopped = reference_model.generate(input_ids=ids, max_new_tokens=5, eos_token_id=first)
    assert stopped.shape == (1, ids.shape[1] + 1)
    assert reference_model.generate(input_ids=ids, max_length=ids.shape[1] + 3).shape[1] == ids.shape[1] + 3


def test_sample_greedy_and_filters():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    assert sample(logits, GenerationConfig(), torch.tensor([], dtype=torch.long)) == 1
    g = torch.Generator().manual_seed(0)
    picks = {
        sample(logits, GenerationConfig(do_sample=True, top_k=2), torch.tensor([], dtype=torch.long), g)
        for _ in range(50)
    }
    assert picks == {1, 2}
    picks = {
        sample(logits, GenerationConfig(do_sample=True, top_p=0.5), torch.tensor([], dtype=torch.long), g)
        for _ in range(50)
    }
    assert picks == {1}
    # Repetition penalty divides positive logits of seen tokens: 3.0 / 4 < 2.0, so token 2 wins.
    penalised = GenerationConfig(repetition_penalty=4.0)
    assert sample(logits, penalised, torch.tensor([1])) == 2


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=0),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(max_new_tokens=0),
        dict(repetition_penalty=0),
    ],
)
def test_bad_settings(bad):
    with pytest.raises(SettingsError):
        GenerationConfig(**bad)


def test_stream_never_emits_half_characters(reference_tokenizer):
    text = "émoji 🙂 and 中文 ok"
    ids = reference_tokenizer.encode(text)
    stream = TextStream(reference_tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == text == stream.text
    assert not any("\ufffd" in p for p in pieces)


def test_stream_holds_back_a_possible_stop_string(reference_tokenizer):
    ids = reference_tokenizer.encode("one two STOP three")
    stream = TextStream(reference_tokenizer, stop=["STOP"])
    shown = ""
    for i in ids:
        shown += stream.push(i)
        assert "ST" not in shown
        if stream.stopped:
            break
    assert stream.stopped and shown == stream.text == "one two "


def test_prompt_too_long(vlm):
    from cogvlm import PromptError

    with pytest.raises(PromptError, match="prompt too long"):
        vlm.chat("word " * 3000)


# ---- the decode state: slots reserved once, rows joining and leaving in place ----------------


def _lone_logits(model, sample, tokens: list[int]) -> torch.Tensor:
    """Logits predicting each of `tokens` (N, V), from one full forward over prompt + tokens:
    no cache, so an expectation the slot code does not produce."""
    ids = torch.cat((sample["input_ids"], torch.tensor(tokens[:-1], dtype=torch.long)))
    types = torch.cat((sample["token_type_ids"], torch.zeros(len(tokens) - 1, dtype=torch.long)))
    with torch.no_grad():
        logits = model(input_ids=ids[None], token_type_ids=types[None], images=[list(sample["images"] or [])]).logits
    return logits[0, len(sample["input_ids"]) - 1 :]


def _greedy_steps(state, sample, steps: int) -> tuple:
    """A bf16 sample prefilled into slot 0, then `steps` greedy decode steps: its Row and the
    logits of the prefill and of each step (steps + 1 of (V,))."""
    from cogvlm.generation.decoder import Row

    batch = collate([sample])
    batch["images"] = [[img.bfloat16() for img in imgs] for imgs in batch["images"]]
    row = Row(GenerationConfig(), sample["input_ids"])
    with torch.no_grad():
        seen = [state.admit([row], batch)[0]]
        row.tokens.append(int(seen[0].argmax()))
        for _ in range(steps):
            state.feed([row])
            seen.append(state.step()[0])
            row.tokens.append(int(seen[-1].argmax()))
    return row, seen


def _admit(state, vlm, sample, config=GenerationConfig()):
    """Prefill one built sample into the state's lowest free slot: (its Row, its logits (1, V))."""
    from cogvlm.generation.decoder import Row

    device = state.cache.index.device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collate([sample]).items()}
    batch["images"] = [[img.to(device) for img in imgs] for imgs in batch["images"]]
    row = Row(config, sample["input_ids"])
    return row, state.admit([row], batch)


@pytest.mark.parametrize("whole_slot", [False, True], ids=["columns-in-use", "whole-slot"])
def test_rows_join_free_slots_and_leave_in_place(vlm, images, monkeypatch, whole_slot):
    """Rows join at different steps (an image prompt among text ones), one leaves and a newcomer
    takes its slot: each row's logits at every step equal its lone full forward, and the cache is
    the same memory throughout. Also when each step attends over the whole slot (what the CPU
    does once most of it is in use), where the columns past each row's end hold a freed row's
    keys and values or nothing."""
    from cogvlm.generation import cache
    from cogvlm.generation.decoder import DecodeState, pick_tokens

    monkeypatch.setattr(cache, "WHOLE_SLOT_SHARE", 0.0 if whole_slot else 2.0)

    model = vlm.model
    samples = [
        vlm.build("What is a cat?"),
        vlm.build("Describe this image.", images[0]),
        vlm.build("Where is the dog?", images[1], [("What is in the image?", "a red cat.")]),
        vlm.build("A picture of"),
    ]
    state = DecodeState(model, 3, 160)
    memory = [(k.data_ptr(), v.data_ptr()) for k, v in state.cache.layers]
    rows, seen = [], []  # each row, and the logits it got at each step

    def join(i):
        row, logits = _admit(state, vlm, samples[i])
        rows.append(row)
        seen.append([logits[0]])
        row.tokens.append(int(logits[0].argmax()))

    with torch.no_grad():
        join(0)
        for step in range(14):
            if step == 2:
                join(1)
            if step == 4:
                join(2)
                assert [r.slot for r in rows] == [0, 1, 2]
            if step == 6:
                state.release(rows[0])  # slot 0 freed in place ...
                assert state.top() == 3 and state.free == 1
            if step == 8:
                join(3)  # ... and taken by the next newcomer
                assert rows[3].slot == 0
            live = [r for r in rows if r.slot >= 0]
            state.feed(live)
            logits = state.select(state.step(), live)
            for row, token in zip(live, pick_tokens(logits, live)):
                seen[rows.index(row)].append(logits[live.index(row)])
                row.tokens.append(token)
    assert [(k.data_ptr(), v.data_ptr()) for k, v in state.cache.layers] == memory
    for row, built, got in zip(rows, samples, seen):
        assert len(got) == len(row.tokens) > 5
        torch.testing.assert_close(torch.stack(got), _lone_logits(model, built, row.tokens), atol=1e-4, rtol=0)


def test_rows_that_share_an_image_prefill_its_prefix_once(vlm, images):
    """Three questions on one picture and two on another, of different lengths (so padded), joining
    a text row already in slot 0: [BOS, image] goes through the network once per picture, the rows
    that share it take a copy, and each row's logits at the prefill and at every greedy step after
    equal its lone full forward (no cache, no batch: an expectation the prefix code does not produce)."""
    from cogvlm.generation.decoder import DecodeState, Row, pick_tokens

    model = vlm.model
    asked = [("Describe this image.", 0), ("What colour is the star in the middle?", 1), ("Where?", 0)]
    asked += [("Is there a dog?", 1), ("What is in the picture of the garden today?", 0)]
    samples = [vlm.build(query, images[i]) for query, i in asked]
    batch = collate(samples)
    batch["image_features"] = vlm.image_cache(model, batch["images"])
    state = DecodeState(model, 7, 120)
    text = vlm.build("What is a cat?")
    first, first_logits = _admit(state, vlm, text)  # slot 0
    rows = [first] + [Row(GenerationConfig(), s["input_ids"]) for s in samples]
    samples.insert(0, text)
    seen_shapes = []
    hook = model.model.layers[0].register_forward_pre_hook(lambda _, args: seen_shapes.append(args[0].shape[:2]))
    try:
        with torch.no_grad():
            logits = torch.cat((first_logits, state.admit(rows[1:], batch, share_prefix=True)))
            seen = [[row_logits] for row_logits in logits]
            for _ in range(6):
                for row, token in zip(rows, pick_tokens(logits, rows)):
                    row.tokens.append(token)
                state.feed(rows)
                logits = state.select(state.step(), rows)
                for got, row_logits in zip(seen, logits):
                    got.append(row_logits)
    finally:
        hook.remove()
    prefix, t = 1 + model.config.image_tokens, batch["input_ids"].shape[1]
    assert seen_shapes[:2] == [(2, prefix), (5, t - prefix)]  # the two prefixes, then every row's text
    assert sorted(row.slot for row in rows) == list(range(6))
    for row, built, got in zip(rows, samples, seen):
        row.tokens.append(int(got[-1].argmax()))
        torch.testing.assert_close(torch.stack(got), _lone_logits(model, built, row.tokens), atol=1e-4, rtol=0)


def test_a_free_slot_keeps_its_image_prefix_while_the_rows_above_it_decode(vlm, images):
    """Slot 0's row (about an image) ends while slot 1's, a text prompt shorter than the image's
    prefix, decodes on: slot 0 is decoded with it (free slots are noise rows) and must not write
    into the prefix it keeps. A row about the same image then joins slot 0, prefilling its text
    alone, and both rows' logits at every step equal their lone full forwards."""
    from cogvlm.generation.decoder import DecodeState, Row, pick_tokens

    model = vlm.model
    state = DecodeState(model, 2, 64)

    def join(sample):
        batch = collate([sample])
        batch["image_features"] = vlm.image_cache(model, batch["images"])
        row = Row(GenerationConfig(), sample["input_ids"])
        with torch.no_grad():
            logits = state.admit([row], batch, share_prefix=True)
        row.tokens.append(int(logits[0].argmax()))
        return row, [logits[0]]

    def step(rows, seen):
        state.feed(rows)
        with torch.no_grad():
            logits = state.select(state.step(), rows)
        for row, token, got, row_logits in zip(rows, pick_tokens(logits, rows), seen, logits):
            row.tokens.append(token)
            got.append(row_logits)

    first = vlm.build("Describe this image.", images[0])
    text = vlm.build("Hi", template_version="base")
    again = vlm.build("Where is the dog?", images[0], [("Describe this image.", "a cat.")])
    prefix = 1 + model.config.image_tokens
    a, seen_a = join(first)
    b, seen_b = join(text)
    assert (a.slot, b.slot) == (0, 1)
    step([a, b], [seen_a, seen_b])
    state.release(a)
    step([b], [seen_b])
    step([b], [seen_b])  # slot 0 free, decoded as noise
    assert b.length < prefix  # so the step's columns stop short of the kept prefix's end
    c, seen_c = join(again)
    assert c.slot == 0 and state.held[0] is not None
    for _ in range(3):
        step([b, c], [seen_b, seen_c])
    for row, built, got in ((a, first, seen_a), (b, text, seen_b), (c, again, seen_c)):
        torch.testing.assert_close(torch.stack(got), _lone_logits(model, built, row.tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("path", ["kernel", "compiled", "eager"])
def test_bf16_cpu_slots_decode_as_the_full_forward(reference_dir, reference_tokenizer, images, monkeypatch, path):
    """A bf16 model on the CPU keeps its keys by row and its values (B, Hkv, K, L) in memory, each
    decode step attends through our kernel where it runs, else the compiled reductions (else,
    on a CPU with AMX, eagerly with oneDNN), and the logits at every step are the lone full
    forward's (which never reads a cache) to bf16's precision."""
    from cogvlm import CogVLMForCausalLM, kernels
    from cogvlm.generation.decoder import DecodeState
    from cogvlm.model import decoder

    if path == "kernel" and not kernels.available():
        pytest.skip("no AVX512-BF16 CPU or no C compiler: the kernel does not run here")
    model = CogVLMForCausalLM.from_pretrained(reference_dir, torch_dtype="bfloat16")
    vlm = Pipeline(model, reference_tokenizer)
    sample = vlm.build("Describe this image.", images[0])
    state = DecodeState(model, 2, 128)
    keys, values = state.cache.layers[0]
    assert keys.stride(-1) == 1 and values.stride(-2) == 1  # keys by row, values by column
    calls = {"kernel": [], "compiled": []}
    compiled, attend = decoder.compiled_attention, kernels.attend

    def counted(name, run):
        return lambda *args: calls[name].append(1) or run(*args)

    monkeypatch.setattr(decoder, "compiled_attention", counted("compiled", compiled))
    monkeypatch.setattr(kernels, "attend", counted("kernel", attend))
    if path != "kernel":
        monkeypatch.setattr(kernels, "attends", lambda *args: False)
    monkeypatch.setattr(decoder, "cpu_has_amx", lambda: path == "eager")
    row, seen = _greedy_steps(state, sample, 8)
    steps = 8 * model.config.num_hidden_layers
    assert {name: len(made) for name, made in calls.items()} == {
        name: steps if name == path else 0 for name in ("kernel", "compiled")
    }
    assert not compiled.failed
    want = _lone_logits(model, {**sample, "images": [img.bfloat16() for img in sample["images"]]}, row.tokens)
    got = torch.stack(seen).float()
    assert (got - want.float()).abs().max().item() < 0.1, (got - want.float()).abs().max().item()


def test_bf16_cpu_grouped_heads_decode_through_the_kernel_as_the_full_forward(cogvlm2_dir, images, monkeypatch):
    """CogVLM2's grouped heads (2 query heads per KV head) in bf16 on the CPU: every decode step's
    attention goes through our kernel (alone, or inside a layer's one call where the layer's
    products are packed), and the logits at every step are the lone full forward's to bf16's
    precision."""
    import cogvlm
    from cogvlm import kernels
    from cogvlm.generation.decoder import DecodeState

    if not kernels.attends_grouped():
        pytest.skip("our kernel attends grouped heads only where built for AVX2 (see kernels.attends_grouped)")
    vlm = cogvlm.load(cogvlm2_dir, device="cpu", dtype="bfloat16")
    model = vlm.model
    assert model.config.num_attention_heads == 2 * model.config.num_kv_heads
    calls, attend, decode_layer = [], kernels.attend, kernels.decode_layer
    monkeypatch.setattr(kernels, "attend", lambda *args: calls.append(1) or attend(*args))
    monkeypatch.setattr(kernels, "decode_layer", lambda *args: calls.append(1) or decode_layer(*args))
    sample = vlm.build("Describe this image.", images[0])
    state = DecodeState(model, 2, 96)
    row, seen = _greedy_steps(state, sample, 8)
    assert len(calls) == 8 * model.config.num_hidden_layers
    want = _lone_logits(model, {**sample, "images": [img.bfloat16() for img in sample["images"]]}, row.tokens)
    assert (torch.stack(seen).float() - want.float()).abs().max().item() < 0.1


@pytest.mark.parametrize("kernel", [True, False])
def test_bf16_cpu_slots_of_grouped_heads_take_the_layout_their_attention_reads(cogvlm2_dir, monkeypatch, kernel):
    """CogVLM2's grouped heads: where our kernel attends them, keys by row and values (B, Hkv, K, L)
    in memory, as for one head per KV head; where it does not, they decode eagerly (oneDNN's product
    of a group's queries and a key block), so keys are stored (B, Hkv, K, L) and values by row."""
    from cogvlm import CogVLMForCausalLM, kernels
    from cogvlm.generation.decoder import DecodeState

    monkeypatch.setattr(kernels, "attends_grouped", lambda: kernel)
    model = CogVLMForCausalLM.from_pretrained(cogvlm2_dir, torch_dtype="bfloat16")
    assert model.config.num_attention_heads > model.config.num_kv_heads
    keys, values = DecodeState(model, 2, 16).cache.layers[0]
    if kernel:
        assert keys.stride(-1) == 1 and values.stride(-2) == 1
    else:
        assert keys.stride(-2) == 1 and values.stride(-1) == 1


def test_a_failed_step_changes_nothing(vlm):
    """A decode step that raises can be made again: it left every row as it was."""
    from cogvlm.generation.decoder import DecodeState

    state = DecodeState(vlm.model, 2, 64)
    row, logits = _admit(state, vlm, vlm.build("What is a cat?"))
    row.tokens.append(int(logits[0].argmax()))
    state.feed([row])
    before = (state.cache.index.clone(), state.positions.clone(), row.length)
    real = state.model
    state.model = lambda **inputs: (real(**inputs), 1 / 0)[1]  # writes the cache, then raises
    with pytest.raises(ZeroDivisionError):
        state.step()
    state.model = real
    assert torch.equal(state.cache.index, before[0]) and torch.equal(state.positions, before[1])
    assert row.length == before[2]
    with torch.no_grad():
        again = state.step()
    torch.testing.assert_close(again[0], _lone_logits(vlm.model, vlm.build("What is a cat?"), row.tokens + [0])[1])


def test_pick_marks_rows_whose_logits_are_not_finite():
    from cogvlm.generation.decoder import NON_FINITE, SAMPLER_FAILED, Row, pick_tokens

    logits = torch.tensor([[1.0, 3.0, 2.0], [float("nan"), 1.0, 0.0], [0.0, float("inf"), 1.0], [0.0, 1.0, 5.0]])
    prompt = torch.tensor([0])
    rows = [Row(GenerationConfig(), prompt) for _ in range(3)]
    rows.append(Row(GenerationConfig(do_sample=True, seed=1), prompt, generator=torch.Generator().manual_seed(1)))
    assert pick_tokens(logits, rows) == [1, NON_FINITE, NON_FINITE, 2]
    broken = Row(GenerationConfig(do_sample=True), prompt, generator="not a generator")  # its sampler raises
    assert pick_tokens(logits[:1], [broken]) == [SAMPLER_FAILED]


def test_slots_that_fit_the_free_memory(reference_model, monkeypatch):
    from cogvlm.generation import cache

    per_slot = sum(cache.slot_bytes(reference_model, 2048).values())
    assert per_slot == cache.SlotCache(reference_model, 1, 2048).nbytes
    free = (cache.PREFILL_RESERVE + 5.5 * per_slot) / cache.FREE_SHARE
    monkeypatch.setattr(cache, "_free_bytes", lambda device: free)
    assert cache.slots_that_fit(reference_model, 2048, cap=32) == 5
    assert cache.slots_that_fit(reference_model, 2048, cap=3) == 3
    assert cache.slots_that_fit(reference_model, 1024, cap=32) == 11
    monkeypatch.setattr(cache, "_free_bytes", lambda device: 0)
    assert cache.slots_that_fit(reference_model, 2048, cap=32) == 1


class HostTensor(torch.Tensor):
    """A tensor the decode state keeps on the host on purpose (a decode step's token types):
    reading it costs no device sync. Ops on it give HostTensors (torch's subclass rules)."""


#: Tensor methods that read a device tensor back to the host (a sync on CUDA).
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy", "to")


@pytest.fixture
def host_reads(monkeypatch):
    """Counts, while `counting` is set, every call that would sync a CUDA device with the host:
    the READS methods (`.to` only towards the CPU), boolean-mask indexing, and `torch.nonzero`;
    calls on HostTensors are free."""
    calls: list[str] = []
    counting = [False]

    def towards_host(args, kwargs) -> bool:
        targets = list(args) + [kwargs.get("device")]
        return any(str(t) == "cpu" or isinstance(t, torch.device) and t.type == "cpu" for t in targets)

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            if counting[0] and not isinstance(self, HostTensor):
                if name != "to" or towards_host(args, kwargs):
                    calls.append(name)
            return original(self, *args, **kwargs)

        return counted

    def indexing(original):
        def counted(self, index, *rest):
            keys = index if isinstance(index, tuple) else (index,)
            if counting[0] and any(isinstance(k, torch.Tensor) and k.dtype == torch.bool for k in keys):
                calls.append("boolean index")
            return original(self, index, *rest)

        return counted

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.Tensor, "__getitem__", indexing(torch.Tensor.__getitem__))
    monkeypatch.setattr(torch.Tensor, "__setitem__", indexing(torch.Tensor.__setitem__))
    monkeypatch.setattr(torch, "nonzero", wrap("torch.nonzero", torch.nonzero))

    class Counter:
        def __enter__(self):
            counting[0] = True
            return calls

        def __exit__(self, *exc):
            counting[0] = False

    return Counter()


def test_a_decode_step_reads_nothing_back_to_the_host(vlm, images, host_reads):
    """The step (positions, write index, masks, the network's forward) issues no call that would
    sync a CUDA device; the one read, the picked tokens, comes after it."""
    from cogvlm.generation.decoder import DecodeState, pick_tokens

    state = DecodeState(vlm.model, 4, 128)
    state.types = state.types.as_subclass(HostTensor)
    rows = []
    with torch.no_grad():
        for sample in (vlm.build("Describe this image.", images[0]), vlm.build("What is a cat?")):
            row, logits = _admit(state, vlm, sample)
            row.tokens.append(int(logits[0].argmax()))
            rows.append(row)
        for _ in range(3):
            state.feed(rows)
            with host_reads as calls:
                logits = state.step()
            for row, token in zip(rows, pick_tokens(state.select(logits, rows), rows)):
                row.tokens.append(token)
    assert calls == []
    with host_reads as calls:  # the counter counts
        int(logits[0, 0]), logits[0].tolist(), state.cache.mask[state.cache.mask], logits.to("cpu")
    assert calls == ["__int__", "tolist", "boolean index", "to"]


def test_cuda_graph_buckets_are_captured_once_and_read_the_state_in_place(vlm, monkeypatch):
    """The CUDA-graph path, on the CPU: a fake capture that keeps the step function (bound to the
    state's tensors at capture) and replays it into the captured output, as a graph would. Each
    bucket is captured once; replays give the eager logits, so the state is only ever updated in
    place between steps."""
    from cogvlm.generation.decoder import MIN_GRAPH_COLUMNS, DecodeGraphs, DecodeState

    captured = []

    def capture(self, step):
        out = step()
        captured.append(out)
        return (lambda: out.copy_(step())), out

    monkeypatch.setattr(DecodeGraphs, "capture", capture)
    graphed, eager = DecodeState(vlm.model, 4, 300, graphs=True), DecodeState(vlm.model, 4, 300)
    assert graphed.graphs.bucket(3, 129) == (4, 256) and graphed.graphs.bucket(1, 2) == (1, MIN_GRAPH_COLUMNS)
    assert graphed.graphs.bucket(4, 299) == (4, 300)  # capped by the cache
    prompts = [vlm.build("What is a cat?"), vlm.build("Describe the dog."), vlm.build("A picture of")]
    answers = []
    with torch.no_grad():
        for state in (graphed, eager):
            rows = []
            for i, sample in enumerate(prompts):
                row, logits = _admit(state, vlm, sample)
                row.tokens.append(int(logits[0].argmax()))
                rows.append(row)
                for _ in range(4 + 3 * i):
                    state.feed(rows)
                    logits = state.select(state.step(), rows)
                    for row, scores in zip(rows, logits):
                        row.tokens.append(int(scores.argmax()))
            answers.append([r.tokens for r in rows])
    assert answers[0] == answers[1]
    assert set(graphed.graphs.graphs) == {(1, 128), (2, 128), (4, 128)}
    assert len(captured) == 3

    def cannot(self, step):
        step()  # the warm-up ran, then the capture failed
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(DecodeGraphs, "capture", cannot)
    state = DecodeState(vlm.model, 2, 64, graphs=True)
    row, logits = _admit(state, vlm, prompts[0])
    row.tokens.append(int(logits[0].argmax()))
    with torch.no_grad():
        for _ in range(3):
            state.feed([row])
            row.tokens.append(int(state.step()[0].argmax()))
    assert state.graphs is None and row.tokens == answers[1][0][: len(row.tokens)]


@pytest.mark.gpu
def test_cuda_decode_step_never_syncs_and_graphs_equal_eager(reference_model, reference_tokenizer):
    """On a GPU: no synchronising call inside a step (CUDA's sync debug mode raises on one), and
    the CUDA-graph steps give the eager steps' tokens."""
    from cogvlm.generation.decoder import DecodeState

    model = reference_model.to("cuda")
    vlm = Pipeline(model, reference_tokenizer)
    try:
        answers = []
        for graphs in (False, True):
            state = DecodeState(model, 4, 256, graphs=graphs)
            assert (state.graphs is not None) == graphs
            rows = []
            with torch.no_grad():
                for sample in (vlm.build("What is a cat?"), vlm.build("Describe the dog.")):
                    row, logits = _admit(state, vlm, sample)
                    row.tokens.append(int(logits[0].argmax()))
                    rows.append(row)
                for i in range(12):
                    state.feed(rows)
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("error" if i else "default")  # the first step captures
                    try:
                        logits = state.step()
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                    for row, scores in zip(rows, state.select(logits, rows)):
                        row.tokens.append(int(scores.argmax()))
            answers.append([r.tokens for r in rows])
        assert answers[0] == answers[1]
    finally:
        reference_model.to("cpu")
