"""Reading serialized JobResults / ValueMaps (a map<string, Value> at field 1) without parsing their values.

The client assembles a large result in one buffer (`result_buffer`) and lets tether.wire.decode_value_map
decode its tensors in place; this module finds names, raw Value bytes and the message's other fields.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from typing import Any

from tether.framing import (
    CHUNK_NUMBERS,
    ENTRY_KEY_NUMBER,
    ENTRY_VALUE_NUMBER,
    EVENT_JOB_ID,
    EVENT_OTHER_KINDS,
    EVENT_RESULT_NUMBER,
    EVENT_SEQUENCE,
    READ_RESULT_CHUNK_NUMBER,
    RESPONSE_NUMBERS,
    TENSOR_NUMBERS,
    VALUE_MAP_NUMBER,
    VALUE_TENSOR_NUMBER,
    fields,
    int64,
)

__all__ = ["ALIGN", "RawChunk", "RawResponse", "RawResultEvent", "chunk_deserializer", "event_deserializer",
           "result_buffer", "split_value_map"]

ALIGN = 64  # bytes: the first top-level tensor's data starts at this alignment in a result buffer
ALIGN_MIN_BYTES = 1 << 20  # smaller buffers are not aligned

_TENSOR_DATA = TENSOR_NUMBERS[2]
_CHUNK_OFFSET, _CHUNK_DATA, _CHUNK_TOTAL = CHUNK_NUMBERS
_EVENT = RESPONSE_NUMBERS[0]


def split_value_map(data: bytes | bytearray | memoryview) -> tuple[dict[str, memoryview], bytes]:
    """(raw Value bytes by name, the message's other fields serialized) of a ValueMap / JobResult."""
    view = memoryview(data).cast("B") if not isinstance(data, memoryview) or data.format != "B" else data
    named: dict[str, memoryview] = {}
    rest: list[memoryview] = []
    for number, wire, start, end, value in fields(view):
        if number != VALUE_MAP_NUMBER or wire != 2:
            rest.append(view[start:end])
            continue
        name, raw = "", memoryview(b"")
        for entry_number, entry_wire, _, _, entry_value in fields(value):
            if entry_number == ENTRY_KEY_NUMBER and entry_wire == 2:
                name = bytes(entry_value).decode()
            elif entry_number == ENTRY_VALUE_NUMBER and entry_wire == 2:
                raw = entry_value
        named[name] = raw
    return named, b"".join(rest)


def _first_tensor_data(view: memoryview) -> int:
    """Offset of the first top-level tensor's data in a (prefix of a) ValueMap / JobResult; -1 if not seen."""
    try:
        for number, wire, _, end, entry in fields(view, prefix=True):
            if number != VALUE_MAP_NUMBER or wire != 2:
                continue
            base = end - len(entry)
            for entry_number, entry_wire, _, entry_end, value in fields(entry, prefix=True):
                if entry_number != ENTRY_VALUE_NUMBER or entry_wire != 2:
                    continue
                base += entry_end - len(value)
                for value_number, value_wire, _, value_end, tensor in fields(value, prefix=True):
                    if value_number != VALUE_TENSOR_NUMBER or value_wire != 2:
                        return -1
                    base += value_end - len(tensor)
                    for tensor_number, tensor_wire, _, tensor_end, data in fields(tensor, prefix=True):
                        if tensor_number == _TENSOR_DATA and tensor_wire == 2:
                            return base + tensor_end - len(data) if len(data) else -1
                    return -1
            return -1
    except ValueError:  # the prefix ended inside a field: the first tensor is not in it
        pass
    return -1


def result_buffer(total: int, first: bytes | bytearray | memoryview = b"") -> bytearray | memoryview:
    """A writable buffer of `total` bytes to assemble a serialized ValueMap / JobResult in.

    `first` is the start of the message (its first chunk): if it shows where the first top-level tensor's
    data lies, the buffer is placed so that data is ALIGN-aligned, so the tensor can use it in place. A large
    buffer is not zero-filled first (every byte of it is written by a chunk before it is read)."""
    if total < ALIGN_MIN_BYTES:
        return bytearray(total)  # small: a misaligned tensor is cheaply copied
    offset = _first_tensor_data(memoryview(first).cast("B")) if len(first) else -1
    storage = _uninitialized(total + ALIGN)
    shift = (-offset) % ALIGN if offset >= 0 else 0  # (the storage starts at a page)
    return storage[shift : shift + total]


def _uninitialized(size: int) -> memoryview:
    """`size` writable bytes of fresh anonymous memory: the kernel supplies each page as a chunk is first copied
    into it; bytearray(size) would write zeros over all of it first (one more pass over the memory, with every
    page faulted in ahead of the copies). Freed with the last view of it (the tensors decoded in place)."""
    return memoryview(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE))


# ------------------------------------------------------------------- result chunks read off the wire as views

RAW_MIN_BYTES = 64 << 10  # responses at least this large are checked for a result chunk to read in place


class RawChunk:
    """A Chunk whose data is a view of the response's bytes (no copy); reads like jobs_pb2.Chunk."""

    __slots__ = ("offset", "data", "total_size")

    def __init__(self, offset: int, data: memoryview, total_size: int):
        self.offset, self.data, self.total_size = offset, data, total_size


class RawResultEvent:
    """A JobEvent that carries a result chunk, read without copying the chunk's data."""

    __slots__ = ("job_id", "sequence", "result")

    def __init__(self, job_id: str, sequence: int, result: RawChunk):
        self.job_id, self.sequence, self.result = job_id, sequence, result

    def WhichOneof(self, name: str) -> str | None:  # noqa: N802 (protobuf's name)
        return "result" if name == "event" else None


class RawResponse:
    """A RunJobResponse / WatchJobResponse / ReadResultResponse holding a RawResultEvent or a RawChunk."""

    __slots__ = ("event", "more_events", "chunk")

    def __init__(self, event: Any = None, chunk: RawChunk | None = None, more_events: list | None = None):
        self.event, self.chunk, self.more_events = event, chunk, more_events or []


def _raw_chunk(view: memoryview) -> RawChunk:
    offset, data, total = 0, memoryview(b""), 0
    for number, wire, _, _, value in fields(view):
        if number == _CHUNK_OFFSET and wire == 0:
            offset = int64(value)
        elif number == _CHUNK_DATA and wire == 2:
            data = value
        elif number == _CHUNK_TOTAL and wire == 0:
            total = int64(value)
    return RawChunk(offset, data, total)


def _raw_result_event(view: memoryview) -> RawResultEvent | None:
    """The event, if it is a result chunk (else None: protobuf parses it)."""
    job_id, sequence, chunk = "", 0, None
    for number, wire, _, _, value in fields(view):
        if number == EVENT_JOB_ID and wire == 2:
            job_id = bytes(value).decode()
        elif number == EVENT_SEQUENCE and wire == 0:
            sequence = int64(value)
        elif number == EVENT_RESULT_NUMBER and wire == 2:
            chunk = _raw_chunk(value)
        elif number in EVENT_OTHER_KINDS:
            return None  # another kind of event (a later oneof field would win; not sent by servers)
    return RawResultEvent(job_id, sequence, chunk) if chunk is not None else None


def event_deserializer(message_type: type) -> Callable[[bytes], Any]:
    """A response deserializer for RunJob / WatchJob (`message_type`: its response, an `event` at field 1 and
    `more_events` at field 2): a large response holding result chunks comes as a RawResponse (each chunk's
    data a view of the bytes received; its other events parsed by protobuf), the rest as usual."""
    parse = message_type.FromString
    parse_event = type(message_type().event).FromString

    def deserialize(raw: bytes) -> Any:
        if len(raw) >= RAW_MIN_BYTES:
            try:
                event, more, chunks = None, [], 0
                for number, wire, _, _, value in fields(memoryview(raw)):
                    if number not in RESPONSE_NUMBERS or wire != 2 or (number == _EVENT and event is not None):
                        raise ValueError("not a plain event response")  # protobuf handles the rest
                    parsed = _raw_result_event(value)
                    chunks += parsed is not None
                    parsed = parsed if parsed is not None else parse_event(bytes(value))
                    if number == _EVENT:
                        event = parsed
                    else:
                        more.append(parsed)
                if chunks and event is not None:
                    return RawResponse(event=event, more_events=more)
            except ValueError:
                pass  # protobuf says what is wrong with it
        return parse(raw)

    return deserialize


def chunk_deserializer(message_type: type) -> Callable[[bytes], Any]:
    """A response deserializer for ReadResult (a `chunk` at field 1): large chunks as RawResponse."""
    parse = message_type.FromString

    def deserialize(raw: bytes) -> Any:
        if len(raw) >= RAW_MIN_BYTES:
            try:
                for number, wire, _, _, value in fields(memoryview(raw)):
                    if number == READ_RESULT_CHUNK_NUMBER and wire == 2:
                        return RawResponse(chunk=_raw_chunk(value))
                    break
            except ValueError:
                pass
        return parse(raw)

    return deserialize
