"""Named values on the wire: ValueMaps framed around tensors' memory (tether.framing), chunks of at most 1 MiB.

A ValueMap, a JobResult and the values of a LocalCall / LocalResult share one wire form (a map<string,
Value> at field 1), so one encoder serves all. Top-level tensors are framed around a view of their memory,
so a large result is copied once (into its chunks) on the way out, and once (into one buffer its tensors
then share) on the way in. Imports tether.values, tether.tensor_codec, tether.framing and tether.v1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from tether import tensor_codec
from tether.framing import (
    ENTRY_KEY_NUMBER,
    ENTRY_VALUE_NUMBER,
    LIST_ITEM,
    LIST_ITEM_NUMBER,
    MAP_ENTRY,
    MAP_ENTRY_NUMBER,
    PAIR_KEY,
    PAIR_KEY_NUMBER,
    PAIR_VALUE,
    PAIR_VALUE_NUMBER,
    TENSOR_NUMBERS,
    VALUE_LIST,
    VALUE_LIST_NUMBER,
    VALUE_MAP,
    VALUE_MAP_NUMBER,
    VALUE_MAP_VALUE_NUMBER,
    VALUE_TENSOR,
    VALUE_TUPLE,
    VALUE_TUPLE_NUMBER,
    fields,
    framed,
    int64,
    read_varint,
    tensor_value,
    value_map_entry,
    value_map_tensor_entry,
)
from tether.tensor_codec import neutral_tensor
from tether.v1 import jobs_pb2, values_pb2
from tether.values import from_value, to_value

__all__ = ["CHUNK_SIZE", "container_pieces", "decode_value_map", "decode_values", "encode_value_map", "join_chunks",
           "split_chunks", "split_pieces"]

CHUNK_SIZE = 1 << 20  # bytes: largest Chunk.data on the wire

_DATA_TYPE, _SHAPE, _DATA, _COMPRESSION = TENSOR_NUMBERS
assert len(VALUE_TENSOR) == 1
_TENSOR_KEY = VALUE_TENSOR[0]  # the first byte of a Value that holds a tensor
_PARSED_BELOW = 32 << 10  # bytes: a smaller Value is parsed by protobuf (C) and its tensor data copied, faster
# than reading its fields by hand in Python (10 vs 15 us for a 2 KiB tensor); larger tensors are used in place
_FRAMED_FROM = 64 << 10  # bytes of tensor data from which a list, tuple or dict of tensors is framed by hand
_MAX_DEPTH = 32  # containers framed (or read) by hand at most this deep; deeper ones go through protobuf
_PLAIN = frozenset({type(None), bool, int, float, str, bytes})
_NOT_FRAMED = object()


def encode_value_map(named: Mapping[str, Any], **options: Any) -> list[bytes | memoryview]:
    """The serialized ValueMap of `named` (also a valid JobResult) as pieces for split_chunks.

    Tensor pieces (in lists, tuples and dicts too, see container_pieces) are views of the tensors' memory
    (kept alive by the views): send them before changing the tensors. Options as for to_value.
    """
    pieces: list[bytes | memoryview] = []
    for name, obj in named.items():
        if not (isinstance(obj, torch.Tensor) and neutral_tensor(obj)):
            if (framed_value := container_pieces(obj, compress=options.get("compress"))) is not None:
                pieces += value_map_entry(name, framed_value)
                continue
            entry = values_pb2.ValueMap(values={name: to_value(obj, **options)})
            pieces.append(entry.SerializeToString())
            continue
        head, data = tensor_codec.tensor_parts(obj, options.get("compress"))
        pieces += value_map_tensor_entry(name, head, data)
    return pieces


def container_pieces(obj: Any, copy: Callable[[torch.Tensor], bool] | None = None,
                     compress: bool | None = None) -> list[bytes | memoryview] | None:
    """The serialized Value of a list, tuple or dict of tensors and plain scalars (at any depth), as pieces
    whose tensor data are views of the tensors' memory, each copied once where `copy(tensor)` says so: the
    bytes to_value(obj) serializes to, without copying the data twice (into Tensor messages, then into their
    serialization; 16 per-step saves of a 49152-wide logit take 12 ms that way, 2 ms this way). None when
    `obj` holds anything else, or too little tensor data for framing by hand to pay."""
    size = _tensor_bytes(obj, 0)
    if size is None or size < _FRAMED_FROM:
        return None
    return _value_pieces(obj, copy, compress)


def _tensor_bytes(obj: Any, depth: int) -> int | None:
    """The bytes of tensor data in `obj`, a tensor or a plain container of tensors and plain scalars; None
    when it holds anything else (or nests deeper than _MAX_DEPTH)."""
    tp = type(obj)
    if tp in _PLAIN:
        return 0
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size() if neutral_tensor(obj) else None
    if depth >= _MAX_DEPTH:
        return None
    if tp is list or tp is tuple:
        items = obj
    elif tp is dict:
        if any(type(key) not in _PLAIN for key in obj):
            return None
        items = obj.values()
    else:
        return None
    total = 0
    for item in items:
        size = _tensor_bytes(item, depth + 1)
        if size is None:
            return None
        total += size
    return total


def _value_pieces(obj: Any, copy: Callable[[torch.Tensor], bool] | None, compress: bool | None) -> list:
    tp = type(obj)
    if tp is list or tp is tuple:
        items: list[bytes | memoryview] = []
        for item in obj:
            items += framed(LIST_ITEM, *_value_pieces(item, copy, compress))
        return framed(VALUE_LIST if tp is list else VALUE_TUPLE, *items)
    if tp is dict:
        entries: list[bytes | memoryview] = []
        for key, item in obj.items():
            entries += framed(MAP_ENTRY, *framed(PAIR_KEY, to_value(key).SerializeToString()),
                              *framed(PAIR_VALUE, *_value_pieces(item, copy, compress)))
        return framed(VALUE_MAP, *entries)
    if isinstance(obj, torch.Tensor):
        head, data = tensor_codec.tensor_parts(obj, compress)
        if copy is not None and isinstance(data, memoryview) and copy(obj):
            data = bytes(data)
        return tensor_value(head, data)
    return [to_value(obj).SerializeToString()]


def decode_value_map(data: bytes | bytearray | memoryview, **options: Any) -> dict[str, Any]:
    """The named values of a serialized ValueMap / JobResult (inverse of encode_value_map).

    Top-level tensors in a writable buffer (join_chunks returns one) use it in place: they share it, so
    it lives as long as any of them. Options as for from_value.
    """
    out = {}
    for number, wire, _, _, entry in fields(memoryview(data).cast("B")):
        if number != VALUE_MAP_NUMBER or wire != 2:
            continue  # another field (JobResult has more): skipped, as protobuf skips unknown fields
        name, value = _entry(entry)
        out[name] = _decode(value, options)
    return out


def decode_values(raw: Mapping[str, memoryview], **options: Any) -> dict[str, Any]:
    """The values of serialized Values by name (views of a ValueMap's buffer, as client/wire.split_value_map
    returns them), decoded as decode_value_map decodes them: for a caller that split the map already."""
    return {name: _decode(value, options) for name, value in raw.items()}


def _decode(value: memoryview, options: dict[str, Any], depth: int = 0) -> Any:
    if len(value) >= _PARSED_BELOW:
        fast = _fast_tensor(value)
        if fast is not None:
            return fast
        if depth < _MAX_DEPTH and (found := _fast_container(value, options, depth)) is not _NOT_FRAMED:
            return found
    return from_value(values_pb2.Value.FromString(value), **options)


def _fast_container(value: memoryview, options: dict[str, Any], depth: int) -> Any:
    """A large list, tuple or dict Value read by hand, its large tensors used in place (the inverse of
    container_pieces); _NOT_FRAMED for any other Value, which protobuf then parses."""
    entries = list(fields(value))
    if len(entries) != 1 or entries[0][1] != 2:
        return _NOT_FRAMED
    number, body = entries[0][0], entries[0][4]
    if number in (VALUE_LIST_NUMBER, VALUE_TUPLE_NUMBER):
        items = []
        for item_number, wire, _, _, item in fields(body):
            if item_number != LIST_ITEM_NUMBER or wire != 2 or (not items and len(item) < _PARSED_BELOW):
                return _NOT_FRAMED  # (small items first: numbers, strings; protobuf parses those faster)
            items.append(_decode(item, options, depth + 1))
        return items if number == VALUE_LIST_NUMBER else tuple(items)
    if number != VALUE_MAP_VALUE_NUMBER:
        return _NOT_FRAMED
    pairs = []
    for entry_number, wire, _, _, entry in fields(body):
        if entry_number != MAP_ENTRY_NUMBER or wire != 2:
            return _NOT_FRAMED
        key = item = memoryview(b"")
        for part_number, part_wire, _, _, part in fields(entry):
            if part_wire != 2 or part_number not in (PAIR_KEY_NUMBER, PAIR_VALUE_NUMBER):
                return _NOT_FRAMED
            key, item = (part, item) if part_number == PAIR_KEY_NUMBER else (key, part)
        if not pairs and len(item) < _PARSED_BELOW:
            return _NOT_FRAMED  # (small values first: protobuf parses those faster)
        pairs.append((key, item))
    return {_decode(key, options, depth + 1): _decode(item, options, depth + 1) for key, item in pairs}


def _entry(view: memoryview) -> tuple[str, memoryview]:
    name, value = "", memoryview(b"")
    for number, _, _, _, field_value in fields(view):
        if number == ENTRY_KEY_NUMBER:
            name = bytes(field_value).decode()
        elif number == ENTRY_VALUE_NUMBER:
            value = field_value
    return name, value


def _fast_tensor(value: memoryview) -> torch.Tensor | None:
    """The tensor of a Value that holds one, read without copying its data; None for other kinds."""
    if len(value) == 0 or value[0] != _TENSOR_KEY:
        return None
    entries = list(fields(value))
    if len(entries) != 1:
        return None
    data_type, shape, compression, data, requires_grad = 0, [], 0, memoryview(b""), False
    for number, wire, _, _, field_value in fields(entries[0][4]):
        if number == _DATA_TYPE:
            data_type = field_value
        elif number == _SHAPE and wire == 2:  # packed
            pos = 0
            while pos < len(field_value):
                size, pos = read_varint(field_value, pos)
                shape.append(size)
        elif number == _SHAPE:
            shape.append(field_value)
        elif number == _DATA:
            data = field_value
        elif number == _COMPRESSION:
            compression = field_value
        elif number == 5:
            requires_grad = bool(field_value)
    return tensor_codec.tensor_from(data_type, tuple(int64(d) for d in shape), compression, data, requires_grad)


def split_chunks(
    data: bytes | bytearray | memoryview | Iterable[bytes | memoryview], chunk_size: int = CHUNK_SIZE
) -> Iterator[jobs_pb2.Chunk]:
    """Chunk messages of at most chunk_size bytes covering `data`: bytes, or pieces from encode_value_map
    (one empty chunk for empty data). Each chunk's bytes are the only copy made."""
    for offset, part, total in split_pieces(data, chunk_size):
        yield jobs_pb2.Chunk(offset=offset, data=part, total_size=total)


def split_pieces(
    data: bytes | bytearray | memoryview | Iterable[bytes | memoryview], chunk_size: int = CHUNK_SIZE
) -> Iterator[tuple[int, bytes, int]]:
    """split_chunks' (offset, data, total_size) of each chunk, for callers that build the Chunk in place."""
    pieces = [memoryview(data).cast("B")] if isinstance(data, (bytes, bytearray, memoryview)) else data
    pieces = [memoryview(p).cast("B") for p in pieces]
    total = sum(len(p) for p in pieces)
    offset, pending, pending_size = 0, [], 0
    for piece in pieces:
        while len(piece):
            take = piece[: chunk_size - pending_size]
            piece = piece[len(take) :]
            pending.append(take)
            pending_size += len(take)
            if pending_size == chunk_size:
                yield offset, b"".join(pending), total
                offset, pending, pending_size = offset + pending_size, [], 0
    if pending_size or total == 0:
        yield offset, b"".join(pending), total


def join_chunks(chunks: Iterable[jobs_pb2.Chunk]) -> bytearray:
    """Reassembles a message from its chunks into one writable buffer, reading no further than its last chunk.

    Raises ValueError on a gap, overlap or inconsistent total_size, and if the chunks end too soon.
    """
    buffer, received, total = bytearray(), 0, None
    for chunk in chunks:
        if total is None:
            total = chunk.total_size
            buffer = bytearray(total)
        size = len(chunk.data)
        if chunk.offset != received or chunk.total_size != total or received + size > total:
            raise ValueError(
                f"chunk at offset {chunk.offset} of {chunk.total_size} bytes does not follow the "
                f"{received} of {total} bytes received so far"
            )
        buffer[received : received + size] = chunk.data
        received += size
        if received == total:
            break
    if total is None or received != total:
        raise ValueError(f"message ended after {received} of {total or 0} bytes")
    return buffer
