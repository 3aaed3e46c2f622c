"""Exception types raised by the agent runtime.

Every failure a user can cause with their input (a wrong folder, a corrupt file, an
unsupported architecture) surfaces as one of these, with a message that names the path
and what is wrong, so the CLI can print it without a traceback. Their base,
``ChainFedError``, lives in ``chainfed.proto.errors`` (the coordinator raises it too)
and is importable from here as well.
"""

from chainfed.proto.errors import ChainFedError

__all__ = ["ChainFedError", "DataError", "ModelLoadError"]


class ModelLoadError(ChainFedError):
    """A model folder, checkpoint, tokenizer or GGUF file cannot be used as given."""


class DataError(ChainFedError):
    """A training data file cannot be read as configured (path, format, encoding, fields)."""
