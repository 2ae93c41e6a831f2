"""The one exception type of the config package (its own file so that every config module can raise it)."""

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the key, the value and the source."""
