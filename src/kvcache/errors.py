"""Error types raised for bad user input.

Every error a user can cause is a `KVCacheError` (a `ValueError`), whose message is one
plain sentence; the CLI prints it and exits with code 2, the server turns it into a 4xx.
"""


class KVCacheError(ValueError):
    """Bad input from the user: unknown model, bad parameter, prompt too long, ..."""


class ModelNotFoundError(KVCacheError):
    """The model name is neither a known name, a local file/folder, nor a reachable hub id."""


class ModelFormatError(KVCacheError):
    """The model file exists but cannot be read (corrupt or unsupported)."""


class PromptTooLongError(KVCacheError):
    """The prompt (plus requested tokens) does not fit in max_model_len."""


class MaxTokensTooLargeError(PromptTooLongError):
    """max_tokens asks for more tokens than the context leaves after the prompt."""
