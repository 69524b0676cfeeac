"""Run a remote job's `local()` blocks on the client, in the caller's names, and build the answers.

One `LocalCalls` per job: its namespace starts as a copy of the caller's and keeps what blocks assign,
so later blocks of the same job see it. A block's exception fails the job and is re-raised afterwards.
"""

from __future__ import annotations

import sys
import traceback
from types import FrameType
from typing import Any

from tether.runtime.cpython import is_tether_frame
from tether.runtime.program import local_block_at, run_local_block
from tether.runtime.saving import StandIn
from tether.v1 import jobs_pb2, values_pb2
from tether.wire import decode_value_map, split_chunks

from .display import StatusDisplay
from .encode import BlockSource, Job, _Encoder
from .errors import local_failure, user_frames
from .events import resolvers
from .wire import result_buffer

__all__ = ["LocalCalls"]


def _user_frame(frame: FrameType) -> bool:
    return not is_tether_frame(frame)


class LocalCalls:
    """Answers one job's LocalCalls. Used from the thread that reads the job's stream only."""

    def __init__(self, job: Job, ns: dict, display: StatusDisplay):
        self._job = job
        self._display = display
        self.ns = dict(ns)  # the caller's names, plus what the server sent and the blocks assigned
        self.kept: dict[str, Any] = {}  # names blocks assigned that the server was not sent (it never reads them)
        self.error: BaseException | None = None  # the first exception a block raised; re-raised after the job
        self._parts: dict[str, tuple[bytearray | memoryview, int]] = {}  # call_id -> (its values' buffer, bytes in)
        self._encoder = _Encoder(job.model, job.model_name)

    def answer(self, call: jobs_pb2.LocalCall) -> list[jobs_pb2.RunJobRequest]:
        """The messages answering `call` once all its chunks arrived ([] while more are expected)."""
        chunk = call.values
        data, total = chunk.data, chunk.total_size
        parts = self._parts.get(call.call_id)
        if parts is None:
            if chunk.offset == 0 and len(data) == total:  # the usual case: one chunk (tensors copy out of it once)
                return self._run(call.call_id, call.block_id, data)
            parts = (result_buffer(total, data), 0)
        buf, received = parts
        if chunk.offset != received or received + len(data) > len(buf):
            raise ValueError(f"local call {call.call_id}: chunk at {chunk.offset} ({len(data)} bytes), expected "
                             f"{received} of {len(buf)}")
        buf[received : received + len(data)] = data
        received += len(data)
        if received < len(buf):
            self._parts[call.call_id] = (buf, received)
            return []
        self._parts.pop(call.call_id, None)
        return self._run(call.call_id, call.block_id, buf)

    def _run(self, call_id: str, block_id: str, data: bytes | bytearray | memoryview) -> list[jobs_pb2.RunJobRequest]:
        try:
            values = decode_value_map(data, **resolvers(self._job, self.ns))
            block = self._block(block_id)
        except Exception as error:  # tether's own failure to set the block up: report it, as the user's would be
            return self._failed(call_id, error, show=False)
        self.ns.update(values)
        for name in values:
            self.kept.pop(name, None)
        self._display.pause()
        try:
            written = run_local_block(block, self.ns)
        except Exception as error:
            return self._failed(call_id, error, show=True)
        finally:
            sys.stdout.flush()
            self._display.resume()
        try:
            payload = self._encode(written)
        except Exception as error:
            return self._failed(call_id, error, show=True)
        return [jobs_pb2.RunJobRequest(local_result=jobs_pb2.LocalResult(call_id=call_id, values=chunk))
                for chunk in split_chunks(payload)]

    def _block(self, block_id: str) -> Any:
        site = self._job.sites.get(block_id)
        if site is None:  # a server that names blocks by line only
            filename, _, line = block_id.rpartition(":")
            base = next(iter(self._job.sites.values()), None)
            if base is None or not line.isdigit():
                raise KeyError(f"the server asked for local() block {block_id!r}, which this job does not have")
            site = BlockSource(filename or base.filename, base.text, int(line))
        return local_block_at(site.filename, site.text, site.first_line)

    def _encode(self, written: dict[str, Any]) -> bytes:
        """Serialized ValueMap of the names remote code reads; the rest stays here (`kept`)."""
        send = {}
        for name, value in written.items():
            if name in self._job.remote_loads and not isinstance(value, StandIn):
                send[name] = value
                self.kept.pop(name, None)
            else:
                self.kept[name] = value
        msg = values_pb2.ValueMap()
        for name, value in send.items():
            msg.values[name].CopyFrom(self._encoder.value(value))
        return msg.SerializeToString()

    def _failed(self, call_id: str, error: Exception, *, show: bool) -> list[jobs_pb2.RunJobRequest]:
        if self.error is None:
            self.error = error
        if show:
            self._display.pause()
            try:
                kept = user_frames(error, _user_frame)
                sys.stderr.write("tether: a local() block raised on this machine; the remote job stops.\n")
                sys.stderr.write("Traceback (most recent call last):\n" + "".join(traceback.format_list(kept)))
                sys.stderr.write("".join(traceback.format_exception_only(type(error), error)))
                sys.stderr.flush()
            finally:
                self._display.resume()
        failure = local_failure(error, user_frame=_user_frame)
        return [jobs_pb2.RunJobRequest(local_result=jobs_pb2.LocalResult(call_id=call_id, failure=failure))]
