"""The pipeline's user-facing errors.  Each is a ValueError (bad input) or RuntimeError
(a failure at run time) that says what is wrong and what to do; the command line maps each
class to its own exit code (cli.EXIT_CODES)."""

from __future__ import annotations


class DocumentError(ValueError):
    """The document cannot be used (missing, unreadable, not text, empty)."""


class QAError(ValueError):
    """A QA file or list that is not a non-empty JSON list of {question, answer} strings."""


class ModelLoadError(ValueError):
    """The model path is not a loadable Hugging Face causal language model."""


class UnsupportedModelError(ValueError):
    """The adapter cannot be attached to this model family."""


class MemoryFileError(ValueError):
    """A memory file that is missing, not a lift-kernels memory file, or made for another
    base model."""
