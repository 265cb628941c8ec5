"""The benchmarks' metrics, each as its official evaluation computes it (see docs/eval.md).

Per-question scores are fractions in [0, 1]; captioning scores are on pycocoevalcap's scale.
"""

from .caption import caption_scores, clean_caption
from .choice import gqa_match, ocrvqa_match, scienceqa_choice, scienceqa_match
from .grounding import box_iou, first_box, grounding_hit, pointing_choice, to_pixels, xywh_to_xyxy
from .tdiuc import tdiuc_match, tdiuc_scores
from .vqa import clean_short_answer, evalai_normalize, process_digit_article, process_punctuation, vqa_accuracy

__all__ = [
    "vqa_accuracy",
    "process_punctuation",
    "process_digit_article",
    "evalai_normalize",
    "clean_short_answer",
    "gqa_match",
    "scienceqa_choice",
    "scienceqa_match",
    "ocrvqa_match",
    "tdiuc_match",
    "tdiuc_scores",
    "caption_scores",
    "clean_caption",
    "box_iou",
    "xywh_to_xyxy",
    "first_box",
    "grounding_hit",
    "pointing_choice",
    "to_pixels",
]
