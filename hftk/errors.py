"""Exceptions that end a run with a one-line message and a documented exit status."""

# Exit statuses (README "Exit status").
EXIT_OK = 0
EXIT_FAILED = 1  # a run that could not go on (non-finite loss, disk full) or an unexpected error
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT after saving a checkpoint; resume to go on


class HftkError(Exception):
    exit_status = EXIT_FAILED

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


class UserError(HftkError):
    """Bad input: a recipe key, a file, a column, a flag. Raised before any model loads."""

    exit_status = EXIT_BAD_INPUT


class RunError(HftkError):
    """The run cannot go on (non-finite loss, no space left); earlier checkpoints are intact."""


class Preempted(HftkError):
    """A stop signal arrived; a full checkpoint was saved at a step boundary."""

    exit_status = EXIT_PREEMPTED


class CollectiveFailure(RunError):
    """Another process stopped answering or ended: every process says so itself, since the one that
    would speak for a machine may be the one that is gone."""

    each_process = True
