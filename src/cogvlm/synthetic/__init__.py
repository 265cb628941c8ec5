"""Synthetic shape scenes and question/answer records for training a tiny CogVLM.

Everything is derived deterministically from a seed so that a model can be trained and evaluated
on CPU without downloads: `make_scene` draws a few coloured shapes on a light background,
`make_varied_scene` draws the pictures people draw (any canvas and background, outlines,
anti-aliasing, JPEG), `make_records` turns a scene into VQA / chat / grounding records in the
training JSONL format, and `write_dataset` / `iter_samples` produce whole datasets.
"""

from .datasets import corpus, draw_scene, iter_samples, iter_scenes, write_dataset
from .records import (
    ALL_TASKS,
    POSITION_MARGIN,
    RELATION_MARGIN,
    RELATIONS,
    TASKS,
    TEMPLATE_OF_TASK,
    check_relations,
    make_caption,
    make_records,
    parse_caption_objects,
)
from .scene import (
    BACKGROUNDS,
    COLOR_JITTER,
    COLORS,
    KINDS,
    MAX_SHAPES,
    PLAIN_KINDS,
    SIZES,
    TEXTURES,
    Look,
    Scene,
    Shape,
    draw_shape,
    format_box,
    make_scene,
    scene_from_dict,
    scene_to_dict,
)
from .varied import make_varied_scene

__all__ = [
    "ALL_TASKS",
    "BACKGROUNDS",
    "COLORS",
    "COLOR_JITTER",
    "KINDS",
    "MAX_SHAPES",
    "PLAIN_KINDS",
    "POSITION_MARGIN",
    "RELATION_MARGIN",
    "RELATIONS",
    "SIZES",
    "TASKS",
    "TEMPLATE_OF_TASK",
    "TEXTURES",
    "Look",
    "Scene",
    "Shape",
    "check_relations",
    "corpus",
    "draw_scene",
    "draw_shape",
    "format_box",
    "iter_samples",
    "iter_scenes",
    "make_caption",
    "make_records",
    "make_scene",
    "make_varied_scene",
    "parse_caption_objects",
    "scene_from_dict",
    "scene_to_dict",
    "write_dataset",
]
