"""Protobuf's wire format written and read by hand, for the hot paths that must not copy tensor data.

Every tag and field number comes from the generated descriptors (tether.v1), computed once at import, so a
`.proto` change shows up here (and in tests/unit/test_framing.py), never as stale literal bytes.
Imports only tether.v1; never torch, grpc, client, server or runtime.
"""

from __future__ import annotations

from collections.abc import Iterator

from google.protobuf.descriptor import FieldDescriptor

from tether.v1 import jobs_pb2, values_pb2

__all__ = ["varint", "varint_size", "int64", "read_varint", "fields", "field_tag", "field_number", "chunk_parts",
           "chunk_length", "read_result_frame", "result_event_prefix", "as_more_events", "submit_job_response",
           "value_map_tensor_entry", "value_map_entry", "tensor_value", "framed"]

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5  # protobuf wire types
_WIRE_TYPES = {
    FieldDescriptor.TYPE_DOUBLE: _I64, FieldDescriptor.TYPE_FIXED64: _I64, FieldDescriptor.TYPE_SFIXED64: _I64,
    FieldDescriptor.TYPE_FLOAT: _I32, FieldDescriptor.TYPE_FIXED32: _I32, FieldDescriptor.TYPE_SFIXED32: _I32,
    FieldDescriptor.TYPE_STRING: _LEN, FieldDescriptor.TYPE_BYTES: _LEN, FieldDescriptor.TYPE_MESSAGE: _LEN,
}


_ONE_BYTE = [bytes([n]) for n in range(0x80)]  # varints below 128 are one byte: taken from here, not built


def varint(n: int) -> bytes:
    """`n` as a protobuf varint (for messages framed by hand)."""
    if 0 <= n < 0x80:
        return _ONE_BYTE[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def varint_size(n: int) -> int:
    """len(varint(n)), without writing it: 7 bits a byte."""
    return (n.bit_length() + 6) // 7 or 1


def int64(n: int) -> int:
    """A varint read as protobuf's int64 (negative numbers travel as their 64-bit two's complement)."""
    return n - (1 << 64) if n >= 1 << 63 else n


def read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    """The varint at `pos` of `view`, and the position after it."""
    if pos < len(view) and view[pos] < 0x80:  # one byte: most tags, field numbers and small lengths
        return view[pos], pos + 1
    result = shift = 0
    while True:
        if pos >= len(view) or shift > 63:
            raise ValueError("truncated or corrupt message")
        byte = view[pos]
        result |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return result, pos


def fields(view: memoryview, *, prefix: bool = False) -> Iterator[tuple[int, int, int, int, memoryview | int]]:
    """(field number, wire type, start of the field, end of the field, value) of each field of a message.

    Varints come as int, length-delimited fields as a view of their payload (it starts at end - len),
    fixed ones as a view. `prefix`: `view` is the start of a message; a length-delimited field it cuts off
    comes as the part it has (its end is then len(view)).
    """
    pos, n = 0, len(view)
    while pos < n:
        start = pos
        key, pos = read_varint(view, pos)
        wire = key & 7
        if wire == _VARINT:
            value, pos = read_varint(view, pos)
        elif wire == _LEN:
            size, pos = read_varint(view, pos)
            if pos + size > n:
                if not prefix:
                    raise ValueError("truncated or corrupt message")
                size = n - pos
            value, pos = view[pos : pos + size], pos + size
        elif wire in (_I64, _I32):
            width = 8 if wire == _I64 else 4
            if pos + width > n:
                raise ValueError("truncated or corrupt message")
            value, pos = view[pos : pos + width], pos + width
        else:
            raise ValueError(f"unexpected wire type {wire}")
        yield key >> 3, wire, start, pos, value


def _field(message: type, name: str) -> FieldDescriptor:
    return message.DESCRIPTOR.fields_by_name[name]


def field_number(message: type, name: str) -> int:
    """The field number of `message.name`, from the generated descriptor."""
    return _field(message, name).number


def field_tag(message: type, name: str) -> bytes:
    """The serialized key (number and wire type) protobuf writes before `message.name`."""
    field = _field(message, name)
    packed = field.is_repeated and field.is_packed  # packed repeated scalars travel as one LEN field
    wire = _LEN if packed else _WIRE_TYPES.get(field.type, _VARINT)
    return varint(field.number << 3 | wire)


def _map_entry(message: type, name: str) -> type:
    """The generated class of map field `message.name`'s entries (key = 1, value = 2)."""
    return getattr(message, _field(message, name).message_type.name)


# ---- tags and numbers, from the descriptors
_ENTRY = _map_entry(values_pb2.ValueMap, "values")
VALUE_MAP_ENTRY = field_tag(values_pb2.ValueMap, "values")
ENTRY_KEY, ENTRY_VALUE = field_tag(_ENTRY, "key"), field_tag(_ENTRY, "value")
ENTRY_KEY_NUMBER, ENTRY_VALUE_NUMBER = field_number(_ENTRY, "key"), field_number(_ENTRY, "value")
VALUE_MAP_NUMBER = field_number(values_pb2.ValueMap, "values")
VALUE_TENSOR = field_tag(values_pb2.Value, "tensor")
VALUE_TENSOR_NUMBER = field_number(values_pb2.Value, "tensor")
TENSOR_DATA = field_tag(values_pb2.Tensor, "data")
VALUE_LIST, VALUE_TUPLE, VALUE_MAP = (field_tag(values_pb2.Value, n) for n in ("list_value", "tuple_value", "map_value"))
VALUE_LIST_NUMBER, VALUE_TUPLE_NUMBER, VALUE_MAP_VALUE_NUMBER = (
    field_number(values_pb2.Value, n) for n in ("list_value", "tuple_value", "map_value"))
LIST_ITEM, LIST_ITEM_NUMBER = field_tag(values_pb2.ValueList, "items"), field_number(values_pb2.ValueList, "items")
MAP_ENTRY, MAP_ENTRY_NUMBER = field_tag(values_pb2.MapValue, "entries"), field_number(values_pb2.MapValue, "entries")
PAIR_KEY, PAIR_VALUE = field_tag(values_pb2.MapEntry, "key"), field_tag(values_pb2.MapEntry, "value")
PAIR_KEY_NUMBER, PAIR_VALUE_NUMBER = field_number(values_pb2.MapEntry, "key"), field_number(values_pb2.MapEntry, "value")
TENSOR_NUMBERS = tuple(field_number(values_pb2.Tensor, n) for n in ("data_type", "shape", "data", "compression"))

CHUNK_OFFSET, CHUNK_DATA, CHUNK_TOTAL = (field_tag(jobs_pb2.Chunk, n) for n in ("offset", "data", "total_size"))
CHUNK_NUMBERS = tuple(field_number(jobs_pb2.Chunk, n) for n in ("offset", "data", "total_size"))
EVENT_JOB_ID, EVENT_SEQUENCE = (field_number(jobs_pb2.JobEvent, n) for n in ("job_id", "sequence"))
EVENT_RESULT = field_tag(jobs_pb2.JobEvent, "result")
EVENT_RESULT_NUMBER = field_number(jobs_pb2.JobEvent, "result")
EVENT_OTHER_KINDS = frozenset(f.number for f in jobs_pb2.JobEvent.DESCRIPTOR.oneofs_by_name["event"].fields
                              if f.name != "result")
RESPONSE_EVENT, RESPONSE_MORE = (field_tag(jobs_pb2.RunJobResponse, n) for n in ("event", "more_events"))
RESPONSE_NUMBERS = tuple(field_number(jobs_pb2.RunJobResponse, n) for n in ("event", "more_events"))
READ_RESULT_CHUNK = field_tag(jobs_pb2.ReadResultResponse, "chunk")
READ_RESULT_CHUNK_NUMBER = field_number(jobs_pb2.ReadResultResponse, "chunk")
SUBMIT_EVENTS = field_tag(jobs_pb2.SubmitJobResponse, "events")

# One framing serves RunJob and WatchJob responses, and a JobResult reads as a ValueMap: the descriptors
# must keep allowing both.
assert ([(f.name, f.number) for f in jobs_pb2.WatchJobResponse.DESCRIPTOR.fields]
        == [(f.name, f.number) for f in jobs_pb2.RunJobResponse.DESCRIPTOR.fields])
assert field_number(jobs_pb2.JobResult, "saved") == VALUE_MAP_NUMBER
# value_map_tensor_entry writes a Tensor's data between its other fields: these follow it.
_TENSOR_AFTER_DATA = tuple(f.name for f in values_pb2.Tensor.DESCRIPTOR.fields if f.number > TENSOR_NUMBERS[2])


_CHUNK_OFFSET_LEN, _CHUNK_DATA_LEN, _CHUNK_TOTAL_LEN = len(CHUNK_OFFSET), len(CHUNK_DATA), len(CHUNK_TOTAL)
_EVENT_RESULT_LEN = len(EVENT_RESULT)


# ---- writers: bytes for bytes what SerializeToString writes (fields in number order, zeros left out)
def framed(key: bytes, *parts: bytes | memoryview) -> list[bytes | memoryview]:
    """The pieces of a length-delimited field `key` (a field_tag) whose bytes are `parts` joined."""
    return [key + varint(sum(len(p) for p in parts)), *parts]


def tensor_value(tensor: values_pb2.Tensor, data: bytes | memoryview) -> list[bytes | memoryview]:
    """The pieces of a serialized Value(tensor=...): `tensor` is the Tensor message without its data, `data`
    its bytes (left uncopied)."""
    head, tail = tensor.SerializeToString(), b""
    after = {name: getattr(tensor, name) for name in _TENSOR_AFTER_DATA}
    if any(after.values()):  # written after the data, as protobuf writes fields in number order
        tail = values_pb2.Tensor(**after).SerializeToString()
        head = head[: len(head) - len(tail)]
    parts = [head, *framed(TENSOR_DATA, data), tail] if len(data) else [head, tail]
    return framed(VALUE_TENSOR, *parts)


def value_map_tensor_entry(
    name: str, tensor: values_pb2.Tensor, data: bytes | memoryview
) -> list[bytes | memoryview]:
    """The pieces of one ValueMap entry `name` -> Value(tensor=...) (see tensor_value)."""
    return value_map_entry(name, tensor_value(tensor, data))


def value_map_entry(name: str, value: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """The pieces of one ValueMap entry `name` -> the serialized Value whose pieces are `value`."""
    return framed(VALUE_MAP_ENTRY, *framed(ENTRY_KEY, name.encode()), *framed(ENTRY_VALUE, *value))


def chunk_length(offset: int, size: int, total: int) -> int:
    """The size of the serialized Chunk(offset, data of `size` bytes, total_size=total)."""
    return ((_CHUNK_OFFSET_LEN + varint_size(offset)) if offset else 0) + (
        (_CHUNK_DATA_LEN + varint_size(size) + size) if size else 0) + (
        (_CHUNK_TOTAL_LEN + varint_size(total)) if total else 0)


def chunk_parts(prefix: bytes, offset: int, views: list[memoryview], total: int) -> list[bytes | memoryview]:
    """The pieces of `prefix` + a serialized Chunk(offset, data=views joined, total_size=total), uncopied.

    `prefix` must already include the framing of whatever holds the Chunk (see result_event_prefix)."""
    size = sum(len(v) for v in views)
    head = (CHUNK_OFFSET + varint(offset) if offset else b"") + (CHUNK_DATA + varint(size) if size else b"")
    tail = CHUNK_TOTAL + varint(total) if total else b""
    return [prefix, head, *views, tail] if size else [prefix, head, tail]


def read_result_frame(offset: int, views: list[memoryview], total: int) -> bytes:
    """A serialized ReadResultResponse(chunk=Chunk(offset, data=views joined, total)): the data's one copy."""
    prefix = READ_RESULT_CHUNK + varint(chunk_length(offset, sum(len(v) for v in views), total))
    return b"".join(chunk_parts(prefix, offset, views, total))


def result_event_prefix(head: bytes, chunk: int, *, more: bool = False) -> bytes:
    """The start of a serialized RunJobResponse / WatchJobResponse whose event (`more`: one of more_events)
    is `head` (a serialized JobEvent without its kind) and a result Chunk of `chunk` bytes that follows."""
    event = len(head) + _EVENT_RESULT_LEN + varint_size(chunk) + chunk
    return b"".join([RESPONSE_MORE if more else RESPONSE_EVENT, varint(event), head, EVENT_RESULT, varint(chunk)])


def as_more_events(response: bytes) -> list[bytes | memoryview]:
    """A serialized response holding only `event`, as pieces holding it as one of `more_events` instead."""
    return [RESPONSE_MORE, memoryview(response)[len(RESPONSE_EVENT):]]


def submit_job_response(response: bytes, frames: list[bytes] | None) -> bytes:
    """A serialized SubmitJobResponse with `frames` (serialized WatchJobResponses) appended as its events."""
    return response + b"".join(SUBMIT_EVENTS + varint(len(f)) + f for f in frames or ())
