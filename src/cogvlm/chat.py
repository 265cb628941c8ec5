"""`cogvlm chat`: the official CLI demo's loop, streaming, on the Pipeline API.

History is kept; `clear` resets it; a line that is the path of an image starts a new
conversation about that image; Ctrl-C stops the current answer, not the program.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .errors import CogVLMError
from .image import load_image

HELP = "Type a question. 'clear' resets, an image path starts a new conversation, 'exit' or Ctrl-D quits."


def interactive_chat(
    vlm: Any, image: str | None, template: str | None, gen: dict[str, Any], read=input, write=None
) -> int:
    """Run until end of input; returns the exit status. `write` defaults to the sys.stdout of the
    call (not of the import), so a redirected stdout gets the answers."""
    write = write or sys.stdout.write
    picture = load_image(image) if image else None
    history: list[tuple[str, str]] = []
    write(f"{HELP}\n{'image: ' + image if image else 'no image: text only'}\n")
    while True:
        try:
            query = read("User: ").strip()
        except EOFError:
            write("\n")
            return 0
        except KeyboardInterrupt:
            write("\n(Ctrl-D or 'exit' quits)\n")
            continue
        if not query:
            continue
        if query in ("exit", "quit"):
            return 0
        if query == "clear":
            history, picture = [], None
            write("(conversation cleared; give an image path or ask without one)\n")
            continue
        if Path(query).is_file():
            try:
                picture = load_image(query)
            except CogVLMError as e:
                write(f"(cannot use that image: {e})\n")
                continue
            history = []
            write(f"(new conversation about {query})\n")
            continue
        write("CogVLM: ")
        answer = ""
        try:
            for piece in vlm.stream(query, picture, history, template, **gen):
                answer += piece
                write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            write(" [stopped]\n")
            continue
        except CogVLMError as e:
            write(f"\n(error: {e})\n")
            continue
        write("\n")
        history.append((query, answer))
