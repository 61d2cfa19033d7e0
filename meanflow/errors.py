"""ConfigError, in a module of its own: every section's home (meanflow.trainer, meanflow.models.config, ...) can raise
it without importing meanflow.config, which imports them all. meanflow.config re-exports it."""


class ConfigError(ValueError):
    """A bad configuration; the message names the key or file."""
