"""A Dask preload for the workers of a LocalCluster (`core/engine.py`): their logs without the
error Dask's worker logs when the scheduler closes its connection during a heartbeat.

A cluster's close removes each worker at the scheduler, which closes that worker's comms; a
heartbeat in flight then fails on the closed comm with a traceback logged at ERROR
(dask/distributed#7105), about one close in twenty here. Only that failure is dropped: a
heartbeat that times out (a scheduler too busy to answer) is still logged.
"""

from __future__ import annotations

import logging

from distributed.comm import CommClosedError

FAILED_HEARTBEAT = "Failed to communicate with scheduler during heartbeat"


class _ClosedHeartbeats(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        closed = record.exc_info is not None and isinstance(record.exc_info[1], CommClosedError)
        return not (closed and record.getMessage().startswith(FAILED_HEARTBEAT))


def dask_setup(worker: object) -> None:
    """Called by Dask in each worker process as it starts (the preload protocol)."""
    logging.getLogger("distributed.worker").addFilter(_ClosedHeartbeats())
