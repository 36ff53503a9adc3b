"""The one error type lit-peft raises for bad input.

The CLI catches it and prints its message alone (no traceback) with a non-zero exit, so every
message must name the problem and say how to fix it.
"""


class ConfigError(ValueError):
    """Bad input from the user: a config value, a file, a column, a label, a module name."""
