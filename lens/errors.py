"""Errors that mean "bad input" (exit code 2). Anything else is treated as retryable."""


class InputError(Exception):
    """Bad input the user must fix: a config key, an argument, a data file. Exit code 2."""

    exit_code = 2


class ConfigError(InputError):
    """A config value is invalid; the message names the key, the value and what is valid."""

    def __init__(self, key: str, value: object, valid: str):
        self.key, self.value, self.valid = key, value, valid
        super().__init__(f"config error: {key}={value!r} is invalid; expected {valid}")
