"""User-facing errors: each carries one line that names the problem (file, field, size)."""


class CogVLMError(Exception):
    """Base class; the CLI prints its message on one line and exits with status 2."""


class CheckpointError(CogVLMError):
    """A model folder, config.json or weight file that cannot be used."""


class ImageError(CogVLMError):
    """An image that cannot be read, is not an image, or is too large."""


class PromptError(CogVLMError):
    """A prompt that cannot be built or does not fit the model."""


class SettingsError(CogVLMError, ValueError):
    """A generation or command setting out of its range (temperature <= 0, ...)."""
