"""Errors meant for people: the message names the bad value, where it came from and what is valid.

Entry points print them without a traceback and exit with status 2 (config) or 1 (everything else).
A worker that stopped on a signal after saving a checkpoint exits with EXIT_PREEMPTED (75, sysexits'
EX_TEMPFAIL: "try again"), which the Slurm job script answers by requeueing the job. A worker whose
collective failed because a peer died, hung or became unreachable exits with EXIT_PEER_LOST (69, sysexits'
EX_UNAVAILABLE), which the job script requeues when slurm.requeue_on_failure=true.
"""

EXIT_PREEMPTED = 75
EXIT_PEER_LOST = 69


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint). Printed as-is, no traceback."""

    exit_code = 1


class ConfigError(UserError):
    exit_code = 2


class DataError(UserError):
    pass


class CheckpointError(UserError):
    pass
