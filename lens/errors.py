"""Errors that mean "bad input" (exit code 2), and the exit codes every `lens` command uses.

The exit codes follow the training operator's `restartPolicy: ExitCode` rule: 1-127 is a permanent failure (the
pod is not restarted), 128 and above is retryable (the pod is recreated). So bad input exits 2 and every fault
that may pass (an outage that outlasted its retries, a crash, a preemption) exits 128 or above.
"""

EXIT_OK = 0
EXIT_INPUT = 2  # bad input: never retried
EXIT_RETRYABLE = 128  # a fault that may pass (not a signal: 128 + N means killed by signal N)


def is_retryable(code: int) -> bool:
    """The operator's rule for a container's exit code (a negative return code, killed by a signal, is too)."""
    return code < 0 or code >= 128


class InputError(Exception):
    """Bad input the user must fix: a config key, an argument, a data file. Exit code 2."""

    exit_code = EXIT_INPUT


class ConfigError(InputError):
    """A config value is invalid; the message names the key, the value and what is valid."""

    def __init__(self, key: str, value: object, valid: str):
        self.key, self.value, self.valid = key, value, valid
        super().__init__(f"config error: {key}={value!r} is invalid; expected {valid}")


class RetryableError(Exception):
    """A fault that may pass (a service unreachable after its retries, a preemption): one line, exit `exit_code`
    (`EXIT_RETRYABLE`, or a preemption's 128 + signal), and the cluster starts the pod again."""

    exit_code = EXIT_RETRYABLE
