"""Exception types raised by the agent runtime.

Every failure a user can cause with their input (a wrong folder, a corrupt file, an
unsupported architecture) surfaces as one of these, with a message that names the path
and what is wrong, so the CLI can print it without a traceback.
"""


class ChainFedError(Exception):
    """Base class of every error ChainFed raises on purpose."""


class ModelLoadError(ChainFedError):
    """A model folder, checkpoint, tokenizer or GGUF file cannot be used as given."""


class DataError(ChainFedError):
    """A training data file cannot be read as configured (path, format, encoding, fields)."""
