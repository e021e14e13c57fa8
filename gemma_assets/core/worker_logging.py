"""A Dask preload for the workers of a LocalCluster (`core/engine.py`): their logs without the
error Dask's worker logs when the scheduler closes its connection during a heartbeat.

A cluster's close removes each worker at the scheduler, which closes that worker's comms; a
heartbeat in flight then fails with a traceback logged at ERROR (dask/distributed#7105), about
one close in twenty here. In a LocalCluster the scheduler lives in the process whose step is
closing it, so the message never tells of a failure that process would not report itself.
"""

from __future__ import annotations

import logging

CLOSED_HEARTBEAT = "Failed to communicate with scheduler during heartbeat"


class _ClosedHeartbeats(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(CLOSED_HEARTBEAT)


def dask_setup(worker: object) -> None:
    """Called by Dask in each worker process as it starts (the preload protocol)."""
    logging.getLogger("distributed.worker").addFilter(_ClosedHeartbeats())
