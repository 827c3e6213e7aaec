"""``ConfigError``: the one exception of a bad config (its own module, so that ``schema`` and ``renames`` share it)."""


class ConfigError(ValueError):
    """A config value is invalid; the message is one line naming the field."""
