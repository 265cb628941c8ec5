"""Token ids to text pieces, incrementally: stop strings, and no half characters.

Each push decodes the row's ids so far and emits what is new, holding back a trailing
replacement character (an unfinished multi-byte character) and any tail that could still
grow into a stop string. The pieces always concatenate to `text`, the final answer.
"""

from __future__ import annotations

from typing import Any, Sequence


class TextStream:
    """The text of one generated row, fed one token at a time."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # emitted so far; the whole answer once finished
        self.stopped = False  # a stop string was reached

    def push(self, token: int) -> str:
        """Add one token; returns the new text that is safe to show (maybe empty)."""
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids)
        cut = self._find_stop(full)
        if cut is not None:
            self.stopped = True
            return self._emit(full, cut)
        return self._emit(full, self._safe_end(full))

    def finish(self) -> str:
        """The rest of the text, held back pieces included."""
        if self.stopped or not self.ids:
            return ""
        return self._emit(self.tokenizer.decode(self.ids), None)

    def _emit(self, full: str, end: int | None) -> str:
        if not full.startswith(self.text):  # a decoder that rewrote earlier text: keep what was shown
            return ""
        piece = full[len(self.text) : end]
        self.text += piece
        return piece

    def _find_stop(self, full: str) -> int | None:
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _safe_end(self, full: str) -> int:
        end = len(full.rstrip("\ufffd"))
        hold = 0
        for stop in self.stop:  # hold back a tail that is the start of a stop string
            for k in range(min(len(stop) - 1, end), 0, -1):
                if full[end - k : end] == stop[:k]:
                    hold = max(hold, k)
                    break
        return max(end - hold, len(self.text))
