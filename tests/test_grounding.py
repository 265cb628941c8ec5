"""Tests for cogvlm.grounding: parsing, formatting, conversion and drawing of boxes."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from cogvlm.grounding import (
    Box,
    boxes_to_json,
    draw_boxes,
    format_box,
    format_boxes,
    parse_boxes,
    pixel_to_normalised,
    strip_boxes,
)

EXAMPLE = "A red circle[[120,340,310,560]] left of a blue star[[600,100,800,300;050,050,100,100]]."


def test_parse_example_labels_and_values():
    boxes = parse_boxes(EXAMPLE)
    assert [b.label for b in boxes] == ["A red circle", "left of a blue star", "left of a blue star"]
    assert boxes[0].box == (0.12, 0.34, 0.31, 0.56)
    assert boxes[1].box == (0.6, 0.1, 0.8, 0.3)
    assert boxes[2].box == (0.05, 0.05, 0.1, 0.1)


def test_parse_example_pixels_and_dicts():
    boxes = parse_boxes(EXAMPLE)
    assert boxes[0].to_pixels(1000, 500) == (120, 170, 310, 280)
    assert boxes[1].to_pixels(640, 480) == (384, 48, 512, 144)
    assert boxes[0].to_dict() == {"label": "A red circle", "box": [0.12, 0.34, 0.31, 0.56]}
    assert boxes[0].to_dict(1000, 500)["pixels"] == [120, 170, 310, 280]
    assert boxes_to_json(boxes, 1000, 500) == [b.to_dict(1000, 500) for b in boxes]


def test_label_is_last_clause_as_written():
    boxes = parse_boxes("There is a cat. A red circle[[100,100,200,200]]")
    assert boxes[0].label == "A red circle"
    boxes = parse_boxes("Where is it? a dog, sitting[[100,100,200,200]]")
    assert boxes[0].label == "sitting"
    assert parse_boxes("[[100,100,200,200]]")[0].label == ""


def test_several_boxes_in_one_group_share_a_label():
    boxes = parse_boxes("two apples[[010,020,030,040;050,060,070,080;100,100,200,200]]")
    assert len(boxes) == 3
    assert {b.label for b in boxes} == {"two apples"}


@pytest.mark.parametrize("bad", ["[[1,2,3]]", "[[a,b,c,d]]", "[[1,2,3,4,5]]", "[[1,2,3,4", "[[]]", "[[1,2,,4]]"])
def test_malformed_groups_are_skipped(bad):
    text = f"a cat[[100,200,300,400]] then {bad} and a dog[[500,600,700,800]]"
    boxes = parse_boxes(text)
    assert [b.box for b in boxes] == [(0.1, 0.2, 0.3, 0.4), (0.5, 0.6, 0.7, 0.8)]
    assert boxes[0].label == "a cat"
    assert boxes[1].label.endswith("a dog")


def test_malformed_box_inside_group_is_dropped_but_valid_kept():
    boxes = parse_boxes("x[[1,2,3;010,020,030,040]]")
    assert [b.box for b in boxes] == [(0.01, 0.02, 0.03, 0.04)]


def test_unclosed_group_does_not_leak_into_label():
    boxes = parse_boxes("a cat[[1,2,3,4 a dog[[100,100,200,200]]")
    assert [(b.label, b.box) for b in boxes] == [("a dog", (0.1, 0.1, 0.2, 0.2))]


def test_whitespace_inside_group_is_tolerated():
    assert parse_boxes("a cup[[ 100 , 200 ,300, 400 ]]")[0].box == (0.1, 0.2, 0.3, 0.4)


def test_no_boxes():
    assert parse_boxes("Nothing grounded here.") == []


def test_strip_boxes():
    assert strip_boxes(EXAMPLE) == "A red circle left of a blue star."
    assert strip_boxes("a cat [[100,100,200,200]] and [[x]] a dog [[1,2,3,4]].") == "a cat and a dog."
    assert "[[" not in strip_boxes(EXAMPLE)


def test_format_box_and_boxes():
    assert format_box((0.12, 0.34, 0.31, 0.56)) == "[[120,340,310,560]]"
    assert format_box((0.0, 0.05, 1.0, -0.2)) == "[[000,050,999,000]]"
    assert format_boxes([(0.6, 0.1, 0.8, 0.3), (0.05, 0.05, 0.1, 0.1)]) == ("[[600,100,800,300;050,050,100,100]]")
    with pytest.raises(ValueError):
        format_boxes([])


def test_pixel_to_normalised():
    assert pixel_to_normalised((64, 48, 320, 240), 640, 480) == (0.1, 0.1, 0.5, 0.5)


ints = st.integers(min_value=0, max_value=999)
int_boxes = st.tuples(ints, ints, ints, ints).map(lambda b: tuple(v / 1000 for v in b))
unit = st.floats(min_value=0.0, max_value=0.999, allow_nan=False)
float_boxes = st.tuples(unit, unit, unit, unit)
sizes = st.integers(min_value=1, max_value=5000)


@given(int_boxes)
def test_roundtrip_exact_for_integer_boxes(box):
    (parsed,) = parse_boxes("thing" + format_box(box))
    assert parsed.box == box
    assert parsed.label == "thing"


@given(float_boxes)
def test_roundtrip_within_half_a_unit(box):
    (parsed,) = parse_boxes(format_box(box))
    for got, want in zip(parsed.box, box):
        assert abs(got - want) <= 0.0005 + 1e-9


@given(st.lists(int_boxes, min_size=1, max_size=5))
def test_roundtrip_several_boxes(boxes):
    parsed = parse_boxes("things" + format_boxes(boxes))
    assert [b.box for b in parsed] == boxes


@given(float_boxes, sizes, sizes)
def test_pixels_agree_with_normalised(box, width, height):
    px = Box("x", box).to_pixels(width, height)
    sizes_xyxy = (width, height, width, height)
    for p, norm, size in zip(px, box, sizes_xyxy):
        assert abs(p - norm * size) <= 1
    back = pixel_to_normalised(px, width, height)
    for b, norm in zip(back, box):
        assert abs(b - norm) <= 1 / min(width, height)


def _blank(size=(400, 300), mode="RGB"):
    return Image.new(mode, size, (255, 255, 255) if mode == "RGB" else 255)


def test_draw_boxes_new_image_input_unchanged():
    image = _blank()
    before = image.tobytes()
    out = draw_boxes(image, parse_boxes(EXAMPLE))
    assert out is not image
    assert out.size == image.size
    assert out.mode == "RGB"
    assert image.tobytes() == before
    assert out.tobytes() != before


def test_draw_boxes_border_colour_and_distinct_labels():
    image = _blank()
    boxes = [
        Box("cat", (0.1, 0.3, 0.4, 0.9)),
        Box("dog", (0.5, 0.3, 0.9, 0.9)),
        Box("cat", (0.45, 0.05, 0.48, 0.2)),
    ]
    out = draw_boxes(image, boxes)
    w, h = out.size

    def left_edge(box):
        x0, y0, _, y1 = box.to_pixels(w, h)
        return out.getpixel((x0, (y0 + y1) // 2))

    cat, dog, cat2 = (left_edge(b) for b in boxes)
    assert cat != (255, 255, 255)
    assert dog != (255, 255, 255)
    assert cat != dog
    assert cat2 == cat  # same label, same colour


def test_draw_boxes_non_rgb_input_and_edge_boxes():
    image = _blank((64, 48), mode="L")
    boxes = [Box("top", (0.0, 0.0, 0.5, 0.5)), Box("", (0.9, 0.9, 1.2, 1.0))]
    out = draw_boxes(image, boxes)
    assert out.mode == "RGB" and out.size == (64, 48)
    assert image.mode == "L"
