"""Token ids to text pieces, incrementally: stop strings, no half characters, linear cost.

Decoding the whole answer at every token would cost O(n^2) over n tokens. Each push instead
decodes a short window: one context token, whose text is already shown, then the tokens whose
text is not shown in full yet. The window's text past what was shown is new. The context is what
makes a window's text continue the answer's: SentencePiece drops the leading spaces of the first
pieces it decodes, and a word-joining decoder puts a space before every word but the first.

Held back (not shown until more tokens come, or `finish`):
- a trailing U+FFFD: a byte-level token can end inside a multi-byte character (Chinese, emoji),
  which decodes as U+FFFD until the rest of its bytes arrive;
- a tail that could still grow into a stop string.

Once a window's text is shown in full, the window restarts at its last token, provided that
token's text alone is not blank (a blank one would lose its spaces to SentencePiece's stripping):
a push decodes the window (1 + the held tokens) and the new context (1 token). Held tokens are the
few of an unfinished character, a stop-string prefix or a run of blank tokens; a run of bytes that
never forms a character (random weights) is held, and decoded at every push, until the next
character. The pieces always concatenate to `text`, the one-shot decode of the tokens pushed
(cut at a stop string). Works with any tokenizer that has `decode(ids)`.
"""

from __future__ import annotations

from typing import Any, Sequence

_PARTIAL = "\ufffd"  # what a decoder shows for the bytes of an unfinished character


class TextStream:
    """The text of one generated row, fed one token at a time."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.text = ""  # emitted so far; the whole answer once finished
        self.stopped = False  # a stop string was reached
        self._window: list[int] = []  # a context token (when there is one), then the held tokens
        self._shown = 0  # characters of the window's text already emitted

    def push(self, token: int) -> str:
        """Add one token; returns the new text that is safe to show (maybe empty)."""
        self._window.append(token)
        full = self.tokenizer.decode(self._window)
        cut = self._find_stop(full)
        if cut is not None:
            self.stopped = True
            return self._emit(full, cut)
        piece = self._emit(full, self._safe_end(full))
        if self._shown >= len(full):
            self._restart()
        return piece

    def finish(self) -> str:
        """The rest of the text, held back pieces included."""
        if self.stopped or not self._window:
            return ""
        return self._emit(self.tokenizer.decode(self._window), None)

    def _restart(self) -> None:
        """All of the window is shown: its last token becomes the context of the next window."""
        context = self.tokenizer.decode(self._window[-1:])
        if context.strip():
            self._window, self._shown = self._window[-1:], len(context)

    def _emit(self, full: str, end: int | None) -> str:
        piece = full[self._shown : end]
        self._shown += len(piece)
        self.text += piece
        return piece

    def _find_stop(self, full: str) -> int | None:
        """Where the first stop string starts in the window's text (none starts in shown text: its
        beginning would have been held back)."""
        hits = [i for i in (full.find(s, self._shown) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _safe_end(self, full: str) -> int:
        end = len(full.rstrip(_PARTIAL))
        hold = 0
        for stop in self.stop:  # hold back a tail that is the start of a stop string
            for k in range(min(len(stop) - 1, end), 0, -1):
                if full[end - k : end] == stop[:k]:
                    hold = max(hold, k)
                    break
        return max(end - hold, self._shown)
