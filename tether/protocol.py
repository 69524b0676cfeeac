"""The protocol's constants, one home for client and server: reserved names, program kinds, job states, limits.

Imports only tether.v1; never torch, grpc, client, server or runtime.
"""

from __future__ import annotations

from tether.v1 import jobs_pb2, program_pb2

__all__ = ["CLIENT_MODULE", "JOB_ID_METADATA", "PROGRAM_KINDS", "PROGRAM_KIND_NAMES", "TERMINAL", "TERMINAL_NAMES", "MAX_MESSAGE_BYTES",
           "state_name"]

CLIENT_MODULE = "__client__"  # Reference.module of a function only the client runs (`@tether.trace`)
# initial metadata of a SubmitJob that waits: the accepted job's id, sent once the job has run 50 ms, so a client
# whose answer is lost (a dropped connection, a server that died) still knows which job to re-attach to
JOB_ID_METADATA = "tether-job-id"

PROGRAM_KINDS = {  # what the user called -> Program.kind
    "trace": program_pb2.PROGRAM_KIND_TRACE,
    "generate": program_pb2.PROGRAM_KIND_GENERATE,
    "session": program_pb2.PROGRAM_KIND_SESSION,
    "scan": program_pb2.PROGRAM_KIND_SCAN,
}
PROGRAM_KIND_NAMES = {kind: name for name, kind in PROGRAM_KINDS.items()}

TERMINAL = frozenset({jobs_pb2.JOB_STATE_COMPLETED, jobs_pb2.JOB_STATE_ERROR, jobs_pb2.JOB_STATE_CANCELLED})

MAX_MESSAGE_BYTES = 256 << 20  # bytes: largest gRPC message either side sends or accepts (a JobSpec with big inputs)


def state_name(state: int) -> str:
    """`JOB_STATE_RUNNING` -> "RUNNING" (what users see)."""
    return jobs_pb2.JobState.Name(state).removeprefix("JOB_STATE_")


TERMINAL_NAMES = frozenset(state_name(s) for s in TERMINAL)
