"""Exceptions raised by vlmkit. Every message names the input it is about and says what to do."""


class VlmkitError(Exception):
    """Base class of all vlmkit errors."""


class InputError(VlmkitError, ValueError):
    """A user-supplied input (image, dataset row, box, argument) is unusable."""


class ModelLoadError(VlmkitError):
    """A checkpoint could not be found, is not supported, or failed to load."""


class LayoutError(VlmkitError):
    """The image-token layout computed for a prompt disagrees with the tokens in ``input_ids``."""
