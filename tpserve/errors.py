"""User-facing errors.

Anything a user can cause (a bad path, config, checkpoint, TP size, request or wire message) is
raised as a `TpserveError` whose message is one sentence naming the thing and the fix. Internal
invariants stay plain asserts.
"""


class TpserveError(ValueError):
    """A problem with user input, reported in one sentence."""


class CheckpointError(TpserveError):
    """The checkpoint on disk is missing, malformed or unsupported."""


class ConfigError(TpserveError):
    """config.json or the quantization config is invalid or unsupported."""
