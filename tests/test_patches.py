"""The `patches` objective: per-patch targets from the scene generator, training of only the
vision side that the head reads, checkpoints that load as a plain CogVLM, exact resume, and a
following language stage."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cogvlm import PRESETS, CogVLMForCausalLM, synthetic
from cogvlm.train import checkpoint, run
from cogvlm.train.config import TrainError
from cogvlm.train.patches import HEAD_FILE, PatchDataset, patch_targets

REFERENCE = Path(__file__).parent / "fixtures" / "reference-tiny"


def config(output_dir: Path, **changes) -> dict:
    return {
        "model_config": "tiny",
        "tokenizer": str(REFERENCE),
        "cpu": True,
        "output_dir": str(output_dir),
        "objective": "patches",
        "data": [
            {"type": "synthetic", "seed": 1, "size": 56},
            {"type": "synthetic", "seed": 2, "size": 56, "easy": True},
        ],
        "batch_size": 8,
        "max_steps": 12,
        "lr": 3e-3,
        "save_every": 0,
        "eval_every": 0,
        **changes,
    }


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_patch_targets_name_the_shape_under_each_patch():
    """A 40 x 20 red rectangle at (8, 8) on a 64 px scene, 4 x 4 grid of 16 px patches."""
    shape = synthetic.Shape("rectangle", "red", "large", (8, 8, 48, 28), (28.0, 18.0))
    targets = patch_targets(synthetic.Scene(64, 64, "white", (shape,)), grid=4)
    kind = targets["kind"].view(4, 4)
    # Rows 0-1 and columns 0-2 are covered (row 0 / column 0 by a quarter: over MIN_COVER).
    expected = torch.zeros(4, 4, dtype=torch.long)
    expected[:2, :3] = 1 + synthetic.KINDS.index("rectangle")
    assert torch.equal(kind, expected)
    on = targets["kind"] > 0
    assert (targets["color"][on] == list(synthetic.COLORS).index("red")).all()
    assert (targets["color"][~on] == -100).all()
    assert torch.allclose(targets["box"][on], torch.tensor([8, 8, 48, 28]) / 64.0)
    assert (targets["box"][~on] == 0).all()


def test_patch_dataset_draws_the_language_tasks_scenes():
    vision = PRESETS["tiny"].vision_config
    item = PatchDataset([{"type": "synthetic", "seed": 5, "size": 56}], PRESETS["tiny"], seed=0)[3]
    scene = synthetic.make_scene(random.Random("5:3"), 56)
    grid = vision.image_size // vision.patch_size
    assert torch.equal(item["kind"], patch_targets(scene, grid)["kind"])
    assert item["pixels"].shape == (3, vision.image_size, vision.image_size)


def test_patch_dataset_draws_varied_scenes_with_their_targets():
    """`varied: true` gives the language tasks' varied scenes (any canvas), targets over the whole canvas."""
    vision = PRESETS["tiny"].vision_config
    grid = vision.image_size // vision.patch_size
    data = PatchDataset([{"type": "synthetic", "seed": 6, "varied": True}], PRESETS["tiny"], seed=0)
    for index in range(4):
        scene = synthetic.make_varied_scene(random.Random(f"6:{index}"))
        want = patch_targets(scene, grid)
        item = data[index]
        assert torch.equal(item["kind"], want["kind"]) and torch.equal(item["color"], want["color"])
        assert item["pixels"].shape == (3, vision.image_size, vision.image_size)
    kinds = {int(k) for index in range(200) for k in data[index]["kind"]}
    assert 1 + synthetic.KINDS.index("ellipse") in kinds  # the new kind has a class of its own


def test_patch_dataset_max_shapes_draws_scenes_of_that_few_shapes():
    """`max_shapes: 1` gives the language tasks' one-shape scenes (room for big shapes) and their targets."""
    vision = PRESETS["tiny"].vision_config
    grid = vision.image_size // vision.patch_size
    data = PatchDataset([{"type": "synthetic", "seed": 7, "varied": True, "max_shapes": 1}], PRESETS["tiny"], seed=0)
    for index in range(6):
        scene = synthetic.make_varied_scene(random.Random(f"7:{index}"), max_shapes=1)
        assert len(scene.shapes) <= 1
        assert torch.equal(data[index]["kind"], patch_targets(scene, grid)["kind"])
    with pytest.raises(TrainError, match="max_shapes 7 .use min_shapes 1 to 6"):
        PatchDataset([{"type": "synthetic", "varied": True, "max_shapes": 7}], PRESETS["tiny"], seed=0)


def test_only_synthetic_sources_are_accepted(tmp_path):
    with pytest.raises(TrainError, match="must be {type: synthetic"):
        run(config(tmp_path, data=[{"type": "jsonl", "path": "x.jsonl"}]))
    with pytest.raises(TrainError, match="per_scene"):
        run(config(tmp_path, data=[{"type": "synthetic", "per_scene": 3}]))
    with pytest.raises(TrainError, match="mode from_scratch"):
        run(config(tmp_path, mode="expert"))
    with pytest.raises(TrainError, match="patch_features 'adapter' \\(use vit or image_tokens\\)"):
        run(config(tmp_path, patch_features="adapter"))


# The head reads the ViT's patches (only the ViT trains) or the decoder's image tokens (the
# adapter's linear_proj trains too; boi/eoi are not read, so they stay).
@pytest.mark.parametrize(
    "features, trained",
    [
        ("vit", ("model.vision.patch_embedding.", "model.vision.transformer.")),
        ("image_tokens", ("model.vision.patch_embedding.", "model.vision.transformer.", "model.vision.linear_proj.")),
    ],
)
def test_patches_stage_trains_only_what_the_head_reads_and_lowers_the_loss(tmp_path, features, trained):
    CogVLMForCausalLM(PRESETS["tiny"]).init_weights().save_pretrained(tmp_path / "init")
    final = run(
        config(
            tmp_path / "run", model=str(tmp_path / "init"), eval_every=12, eval_batch_size=8, patch_features=features
        )
    )
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"]
    assert {"eval_patch_kind_acc", "eval_patch_color_acc", "eval_patch_box_l1"} <= set(records[-1])
    # The checkpoint is a plain CogVLM (head aside) in which only the trained part has moved.
    CogVLMForCausalLM.from_pretrained(final)
    after = weights(final)
    for name, tensor in weights(tmp_path / "init").items():
        assert torch.equal(after[name], tensor) != name.startswith(trained), name
    assert (final / HEAD_FILE).is_file()


def test_patches_resume_is_exact_and_a_language_stage_follows(tmp_path):
    settings = dict(save_every=6, min_lr_ratio=1.0)  # a constant lr: 6 steps are a prefix of 12
    baseline = run(config(tmp_path / "a", **settings))
    run(config(tmp_path / "b", **settings, max_steps=6))
    resumed = run(config(tmp_path / "b", **settings, resume=True))
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path / "b")][-1] == "step-12"
    a, b = weights(baseline), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(
        torch.equal(x, y)
        for x, y in zip(load_file(baseline / HEAD_FILE).values(), load_file(resumed / HEAD_FILE).values())
    )
    # A language stage after it starts from its ViT.
    staged = run(
        config(
            tmp_path / "c",
            data=[],
            objective="lm",
            stages=[
                {"name": "eyes", "objective": "patches", "data": config(tmp_path)["data"], "max_steps": 2},
                {
                    "name": "talk",
                    "data": [{"type": "synthetic", "seed": 3, "size": 56, "per_scene": 2}],
                    "batch_size": 2,
                    "max_steps": 2,
                },
            ],
        )
    )
    eyes = weights(tmp_path / "c" / "eyes" / "checkpoints" / "step-2")
    assert staged.parent.parent.name == "talk" and not (staged / HEAD_FILE).exists()
    assert not torch.equal(
        weights(staged)["model.vision.transformer.layers.0.mlp.fc1.weight"],
        eyes["model.vision.transformer.layers.0.mlp.fc1.weight"],
    )
