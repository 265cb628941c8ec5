"""Captioning metrics through pycocoevalcap, the COCO caption evaluation's own code.

Candidates and references both go through its PTB tokenizer (Stanford CoreNLP, Java), then
BLEU-4 (corpus level), ROUGE-L, CIDEr (its CIDEr-D, document frequencies from the references
being scored, so subsets are not comparable to full splits) and METEOR 1.5 (Java). Values are on
pycocoevalcap's scale: papers print CIDEr x 100 (e.g. 148.7 is 1.487 here).
pycocoevalcap is optional (`pip install cogvlm[eval]`) and imported only when needed.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
from collections.abc import Mapping, Sequence
from types import SimpleNamespace

from ...errors import CogVLMError
from ...grounding import strip_boxes


def _scorers() -> SimpleNamespace:
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        raise CogVLMError("captioning metrics need pycocoevalcap: pip install cogvlm[eval]") from None
    if shutil.which("java") is None:
        raise CogVLMError(
            "captioning metrics need Java for the PTB tokenizer and METEOR (e.g. apt-get install default-jre-headless)"
        )
    return SimpleNamespace(Bleu=Bleu, Cider=Cider, Meteor=Meteor, Rouge=Rouge, PTBTokenizer=PTBTokenizer)


def caption_scores(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], meteor: bool = True
) -> dict[str, float]:
    """Corpus scores {"BLEU-4", "ROUGE-L", "CIDEr", "METEOR"} of one caption per image id.

    `references` fixes the images scored; every one needs a prediction and at least one
    reference. `meteor=False` skips METEOR (it starts a JVM with a 2 GB heap, ~6 s).
    """
    missing = [k for k in references if k not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} images have no prediction, e.g. {missing[0]!r}")
    empty = [k for k, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"{len(empty)} images have no reference caption, e.g. {empty[0]!r}")
    lib = _scorers()
    tokenizer = lib.PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in refs] for k, refs in references.items()})
    res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in references})
    with contextlib.redirect_stdout(io.StringIO()):  # BLEU prints its n-gram statistics
        bleu, _ = lib.Bleu(4).compute_score(gts, res)
        rouge, _ = lib.Rouge().compute_score(gts, res)
        cider, _ = lib.Cider().compute_score(gts, res)
    scores = {"BLEU-4": float(bleu[3]), "ROUGE-L": float(rouge), "CIDEr": float(cider)}
    if meteor:
        scorer = lib.Meteor()
        try:
            scores["METEOR"] = float(scorer.compute_score(gts, res)[0])
        finally:
            del scorer  # its __del__ stops the JVM
    return scores


_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def clean_caption(text: str) -> str:
    """A generated caption as a single sentence: first line, first sentence, no boxes, no quotes."""
    line = strip_boxes(text.strip().split("\n", 1)[0])
    sentence = _SENTENCE_END.split(line, maxsplit=1)[0]
    return sentence.strip().strip("\"'“”").strip()
