"""Errors that carry the process exit code fixed by the contract.

Raise these where input enters (CLI, loaders); the CLI prints the one-line message and
exits with the code. Every message names the problem and the fix.
"""

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_TARGET_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130


class SparsedeployError(Exception):
    exit_code = EXIT_BAD_INPUT


class BadInput(SparsedeployError):
    """The user's input is wrong; the message says how to fix it (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class TargetUnavailable(SparsedeployError):
    """The target cannot run on this machine: engine missing, no GPU (exit 3)."""

    exit_code = EXIT_TARGET_UNAVAILABLE


class GateFailed(SparsedeployError):
    """The job ran, but a quality or latency gate failed (exit 1)."""

    exit_code = EXIT_GATE_FAILED


class Interrupted(SparsedeployError):
    """Ctrl-C: raised from the SIGINT handler so that cleanup runs (exit 130)."""

    exit_code = EXIT_INTERRUPTED
