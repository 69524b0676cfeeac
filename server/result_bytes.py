"""A job's serialized result as the pieces it was encoded in, and the result-chunk events cut from them without
joining it into one buffer (jobs.py keeps both in a job's record); a Frame, a response still in those pieces,
joined only as gRPC sends it. Imports protobuf and tether's framing only.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from google.protobuf import timestamp_pb2

from tether.framing import chunk_length, chunk_parts, result_event_prefix
from tether.v1 import jobs_pb2

__all__ = ["Frame", "ResultBytes", "ResultChunk"]


class ResultBytes:
    """A serialized JobResult kept as the pieces it was encoded in (bytes, or memoryviews of tensors' memory):
    chunks are cut from them directly, so the result is never joined into one buffer."""

    def __init__(self, pieces: bytes | bytearray | memoryview | list):
        if isinstance(pieces, (bytes, bytearray, memoryview)):
            pieces = [pieces]
        self.pieces = [memoryview(p).cast("B") for p in pieces if len(p)]
        self.starts, size = [], 0
        for piece in self.pieces:
            self.starts.append(size)
            size += len(piece)
        self.size = size

    def __len__(self) -> int:
        return self.size

    def views(self, offset: int, size: int) -> list[memoryview]:
        """Memoryviews covering bytes [offset, offset + size) (no copy)."""
        out, end = [], min(offset + size, self.size)
        i = max(0, bisect.bisect_right(self.starts, offset) - 1)
        while offset < end and i < len(self.pieces):
            piece, start = self.pieces[i], self.starts[i]
            take = piece[offset - start : end - start]
            out.append(take)
            offset += len(take)
            i += 1
        return out

    def tobytes(self) -> bytes:
        return b"".join(self.pieces)


class Frame(list):
    """A serialized response still in pieces (views of a result's memory, small bytes): joined, its data's one
    copy, right before gRPC sends it (service.py's serializer), so a stream never copies ahead of what it
    sends. It holds the result, whose memory (a worker's result area) is not handed back while a frame of it
    waits."""

    __slots__ = ("result",)

    def __init__(self, parts: list, result: ResultBytes | None):
        super().__init__(parts)
        self.result = result


@dataclass(frozen=True)
class ResultChunk:
    """A result-chunk event, kept as a position in Job.result (the bytes are not stored twice)."""

    sequence: int
    time: timestamp_pb2.Timestamp
    offset: int
    size: int

    def parts(self, job_id: str, result: ResultBytes, more: bool = False) -> list[bytes | memoryview]:
        """Its serialized RunJobResponse (the event as `event`; `more`: as one of more_events), as pieces:
        the data stays views of the result's pieces until the message is joined (its one copy)."""
        head = jobs_pb2.JobEvent(job_id=job_id, sequence=self.sequence, time=self.time).SerializeToString()
        prefix = result_event_prefix(head, chunk_length(self.offset, self.size, result.size), more=more)
        return chunk_parts(prefix, self.offset, result.views(self.offset, self.size), result.size)

    def frame(self, job_id: str, result: ResultBytes) -> bytes:
        """Its serialized RunJobResponse, built straight from the result's pieces (one copy of the data)."""
        return b"".join(self.parts(job_id, result))
