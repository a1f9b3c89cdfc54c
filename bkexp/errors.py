"""Errors shared by every layer (no imports): what a config value bkexp refuses raises."""


class ConfigError(ValueError):
    """A config value or key that bkexp refuses, with the valid choices in the message."""
