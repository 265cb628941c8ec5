"""The optional packages of batch jobs (pyarrow, ray), named with their install line when missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import CogVLMError


def require(module: str, why: str = "") -> ModuleType:
    """Import `module`, or a one-line CogVLMError saying which extra brings it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not module.startswith(e.name.split(".")[0]):
            raise
        top = module.split(".")[0]
        need = f" for {why}" if why else ""
        raise CogVLMError(f"batch jobs need {top}{need}, which is not installed: pip install 'cogvlm[batch]'") from None
