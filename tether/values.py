"""Converts Python values to and from tether.v1 Value messages: the one module client and server both use.

Imports torch, lz4, cloudpickle, tether.v1 and tether.safe_pickle; never grpc, client, server or the runtime engine.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import io
import sys
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import cloudpickle
import lz4.block
import torch

from tether.safe_pickle import safe_loads
from tether.v1 import jobs_pb2, values_pb2

__all__ = [
    "varint",
    "read_varint",
    "CHUNK_SIZE",
    "COMPRESS_MIN_BYTES",
    "decode_tensor",
    "decode_value_map",
    "encode_tensor",
    "encode_value_map",
    "from_value",
    "from_value_map",
    "import_reference",
    "join_chunks",
    "split_chunks",
    "split_pieces",
    "to_value",
    "to_value_map",
]

CHUNK_SIZE = 1 << 20  # bytes: largest Chunk.data on the wire
COMPRESS_MIN_BYTES = 64 << 10  # bytes: smaller tensors are never compressed
_SAMPLE_PIECES, _SAMPLE_PIECE_BYTES = 4, 16 << 10  # a 64 KiB sample, from 4 places in the tensor
_MIN_SAMPLE_RATIO = 0.9  # compress only if the sample shrinks below this fraction
_LZ4_MAX_INPUT = 0x7E000000  # bytes: LZ4_MAX_INPUT_SIZE


def _dtype_table() -> dict[torch.dtype, int]:
    """DATA_TYPE_<NAME> <-> torch.<name>, for every name this torch has."""
    table = {}
    for enum_name, number in values_pb2.DataType.items():
        dtype = getattr(torch, enum_name.removeprefix("DATA_TYPE_").lower(), None)
        if isinstance(dtype, torch.dtype):
            table[dtype] = number
    return table


_DTYPES: dict[torch.dtype, int] = _dtype_table()
_TORCH_DTYPES: dict[int, torch.dtype] = {number: dtype for dtype, number in _DTYPES.items()}

Resolver = Callable[[Any], Any]


def _check_little_endian() -> None:
    if sys.byteorder != "little":
        raise NotImplementedError("tether's wire format is little-endian; big-endian hosts are not supported")


# ---------------------------------------------------------------------------------------------- tensors


def _host_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy view of a contiguous CPU tensor's bytes; the view keeps the tensor alive."""
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return memoryview(b"")
    array = (ctypes.c_char * nbytes).from_address(t.data_ptr())
    array.keep_alive = t
    return memoryview(array).cast("B")


def _worth_compressing(raw: memoryview) -> bool:
    """lz4 only where it pays: a 64 KiB sample from 4 places must shrink below 90%."""
    n = len(raw)
    if n < COMPRESS_MIN_BYTES or n > _LZ4_MAX_INPUT:
        return False
    step = n // _SAMPLE_PIECES
    sample = b"".join(raw[i * step : i * step + _SAMPLE_PIECE_BYTES] for i in range(_SAMPLE_PIECES))
    return len(lz4.block.compress(sample, store_size=False)) < _MIN_SAMPLE_RATIO * len(sample)


def _tensor_parts(t: torch.Tensor, compress: bool | None) -> tuple[values_pb2.Tensor, bytes | memoryview]:
    """A Tensor message without its data, and the data: a view of the tensor's memory or lz4 bytes."""
    _check_little_endian()
    number = _DTYPES.get(t.dtype)
    if number is None:
        raise TypeError(
            f"cannot send a {t.dtype} tensor as a neutral tensor: tether supports {_dtype_names()}"
        )
    if t.layout is not torch.strided or t.is_meta:
        raise TypeError(f"cannot send a {t.layout} {t.device.type} tensor: it has no dense data to send")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()  # also materializes expanded / strided views
    raw = _host_bytes(t)
    head = values_pb2.Tensor(data_type=number, shape=t.shape, compression=values_pb2.COMPRESSION_NONE)
    if compress is None:
        compress = _worth_compressing(raw)
    if compress and 0 < len(raw) <= _LZ4_MAX_INPUT:
        packed = lz4.block.compress(raw, store_size=False)
        if len(packed) < len(raw):
            head.compression = values_pb2.COMPRESSION_LZ4
            return head, packed
    return head, raw


def encode_tensor(t: torch.Tensor, *, compress: bool | None = None) -> values_pb2.Tensor:
    """A Tensor message: dtype, shape and little-endian row-major bytes of `t` (detached, on the host).

    compress: None decides per tensor (lz4 when >= 64 KiB and a sample shrinks below 90%); True or
    False forces it (True still sends raw bytes when lz4 does not shrink them).
    """
    msg, data = _tensor_parts(t, compress)
    msg.data = bytes(data)
    return msg


def decode_tensor(msg: values_pb2.Tensor) -> torch.Tensor:
    """A new, writable CPU tensor from a Tensor message (bit-exact inverse of encode_tensor)."""
    return _tensor_from(msg.data_type, tuple(msg.shape), msg.compression, msg.data)


def _tensor_from(data_type: int, shape: tuple[int, ...], compression: int, data: Any) -> torch.Tensor:
    """The tensor for decoded Tensor fields. `data` is bytes-like; a writable memoryview (of a buffer
    the caller hands over, see decode_value_map) is used in place when aligned, anything else is copied."""
    _check_little_endian()
    dtype = _TORCH_DTYPES.get(data_type)
    if dtype is None:
        raise ValueError(f"tensor message has unknown data_type {data_type}; the sender is newer than tether")
    numel = 1
    for size in shape:
        numel *= size
    nbytes = numel * dtype.itemsize
    if compression == values_pb2.COMPRESSION_LZ4:
        data = lz4.block.decompress(data, uncompressed_size=nbytes, return_bytearray=True)
        if len(data) != nbytes:
            raise ValueError(f"lz4 tensor data decompressed to {len(data)} bytes, expected {nbytes}")
    elif compression not in (values_pb2.COMPRESSION_NONE, values_pb2.COMPRESSION_UNSPECIFIED):
        raise ValueError(f"tensor message has unknown compression {compression}")
    if len(data) != nbytes:
        raise ValueError(f"tensor of shape {list(shape)} and {dtype} needs {nbytes} bytes, got {len(data)}")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    if isinstance(data, bytearray) or (isinstance(data, memoryview) and not data.readonly):
        out = torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(shape)
        return out if out.data_ptr() % dtype.itemsize == 0 else out.clone()  # kernels want aligned data
    out = torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():  # read-only source: only read from, never handed out
        warnings.simplefilter("ignore", UserWarning)
        source = torch.frombuffer(data, dtype=torch.uint8)
    out.reshape(-1).view(torch.uint8).copy_(source)
    return out


def _dtype_names() -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in _DTYPES)


# ----------------------------------------------------------------------------------------------- values

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def to_value(
    obj: Any,
    *,
    allow_pickle: bool = True,
    compress: bool | None = None,
    default: Callable[[Any], values_pb2.Value | None] | None = None,
) -> values_pb2.Value:
    """The Value message for `obj`, in a language-neutral form wherever one exists.

    Neutral: None, bool, int, float, str, bytes, list, tuple, dict (any convertible keys, order kept),
    torch.Tensor, torch.Size, torch.dtype, numpy arrays, modules and importable functions/classes (as a
    Reference). `default(obj)` may return a Value for anything else (e.g. a model as ModelReference);
    otherwise the object is pickled with cloudpickle (its tensors stay neutral) if allow_pickle, or a
    TypeError names it. Subclasses of neutral types (namedtuple, OrderedDict, IntEnum) are pickled to keep
    their type, or sent as their base type when allow_pickle is False. Tensors are detached copies.
    """
    tp = type(obj)
    if obj is None:
        return values_pb2.Value(null_value=values_pb2.Null())
    if tp is bool:
        return values_pb2.Value(bool_value=obj)
    if tp is int:
        if _INT64_MIN <= obj <= _INT64_MAX:
            return values_pb2.Value(int_value=obj)
        return values_pb2.Value(big_int_value=str(obj))
    if tp is float:
        return values_pb2.Value(double_value=obj)
    if tp is str:
        return values_pb2.Value(string_value=obj)
    if tp is bytes:
        return values_pb2.Value(bytes_value=obj)
    if isinstance(obj, torch.Tensor) and _neutral_tensor(obj):
        return values_pb2.Value(tensor=encode_tensor(obj, compress=compress))
    if tp is torch.Size:
        return values_pb2.Value(shape_value=values_pb2.Shape(dims=obj))
    if tp is torch.dtype and obj in _DTYPES:
        return values_pb2.Value(data_type_value=_DTYPES[obj])

    def convert(item: Any) -> values_pb2.Value:
        return to_value(item, allow_pickle=allow_pickle, compress=compress, default=default)

    if tp is list:
        return values_pb2.Value(list_value=values_pb2.ValueList(items=[convert(x) for x in obj]))
    if tp is tuple:
        return values_pb2.Value(tuple_value=values_pb2.ValueList(items=[convert(x) for x in obj]))
    if tp is dict:
        return values_pb2.Value(map_value=_map(obj, convert))
    ndarray = _numpy_tensor(obj)
    if ndarray is not None:
        return values_pb2.Value(ndarray_value=encode_tensor(ndarray, compress=compress))
    ref = _reference(obj)
    if ref is not None:
        return values_pb2.Value(reference=ref)
    if default is not None and (custom := default(obj)) is not None:
        return custom
    if allow_pickle:
        return values_pb2.Value(pickled=_pickle(obj, compress))
    for base in (bool, int, float, str, bytes):  # subclasses degrade to their base type
        if isinstance(obj, base):
            return convert(base(obj))
    if isinstance(obj, (list, tuple)):
        return convert(tuple(obj) if isinstance(obj, tuple) else list(obj))
    if isinstance(obj, Mapping):
        return values_pb2.Value(map_value=_map(obj, convert))
    raise TypeError(
        f"cannot send a {tp.__module__}.{tp.__qualname__} without pickling it: convert it to tensors, "
        f"numbers, strings, lists or dicts first (pickling is disabled here)"
    )


def _neutral_tensor(t: torch.Tensor) -> bool:
    return t.dtype in _DTYPES and t.layout is torch.strided and not t.is_meta


def _map(obj: Mapping, convert: Callable[[Any], values_pb2.Value]) -> values_pb2.MapValue:
    return values_pb2.MapValue(
        entries=[values_pb2.MapEntry(key=convert(k), value=convert(v)) for k, v in obj.items()]
    )


def _numpy_tensor(obj: Any) -> torch.Tensor | None:
    np = sys.modules.get("numpy")  # only if the caller already uses numpy
    if np is None or type(obj) is not np.ndarray or obj.dtype.byteorder not in "=|<":
        return None
    if not obj.flags.writeable or not obj.flags.c_contiguous:
        # torch.from_numpy warns on read-only arrays and fails on negative strides
        obj = np.array(obj, order="C")
    try:
        t = torch.from_numpy(obj)
    except TypeError:  # object, string, datetime arrays...
        return None
    return t if _neutral_tensor(t) else None


def _reference(obj: Any) -> values_pb2.Reference | None:
    """Modules, functions and classes travel by name, never as pickled code.

    The name is a public import path where one exists (torch.nn.functional.gelu, not torch._C._nn.gelu);
    user code (e.g. in __main__) keeps its own name, which a server refuses with an allow-list error.
    """
    if isinstance(obj, types.ModuleType):
        return values_pb2.Reference(module=obj.__name__)
    if not isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
        return None
    if isinstance(obj, types.BuiltinFunctionType) and not isinstance(
        obj.__self__, (types.ModuleType, type(None))
    ):
        return None  # a bound method of some object, such as [].append
    try:
        path = _import_path(obj)
    except TypeError:  # unhashable
        path = None
    if path is None and isinstance(obj, (type, types.FunctionType)):
        path = (getattr(obj, "__module__", None) or "", obj.__qualname__)
    return values_pb2.Reference(module=path[0], qualname=path[1]) if path else None


def _is_private(dotted: str) -> bool:
    return any(part.startswith("_") or "<" in part for part in dotted.split("."))


@functools.lru_cache(maxsize=1024)
def _import_path(obj: Any) -> tuple[str, str] | None:
    module = getattr(obj, "__module__", None)
    names = [
        n for n in (getattr(obj, "__qualname__", None), getattr(obj, "__name__", None)) if isinstance(n, str)
    ]
    if not isinstance(module, str) or not names:
        return None
    found = []
    for name in names:
        try:
            if import_reference(values_pb2.Reference(module=module, qualname=name)) is obj:
                found.append((module, name))
        except (ImportError, AttributeError):
            pass
    public = [p for p in found if not _is_private(f"{p[0]}.{p[1]}")]
    if public:
        return public[0]
    # a public module of the same package that re-exports it (no imports, no lazy-module side effects)
    root, name = module.split(".")[0], names[-1]
    owners = [
        mod_name
        for mod_name, mod in list(sys.modules.items())
        if (mod_name == root or mod_name.startswith(root + "."))
        and not _is_private(mod_name)
        and getattr(mod, "__dict__", {}).get(name) is obj
    ]
    if owners and not _is_private(name):
        return (min(owners, key=lambda m: (m.count("."), len(m))), name)
    return found[0] if found else None


class _TensorPickler(cloudpickle.Pickler):
    """cloudpickle that leaves tensors out of the pickle: each becomes a persistent id into `tensors`."""

    def __init__(self, file: io.BytesIO, compress: bool | None):
        super().__init__(file, protocol=5)
        self.tensors: list[values_pb2.Tensor] = []
        self._ids: dict[int, tuple[int, torch.Tensor]] = {}  # id(tensor) -> (index, tensor kept alive)
        self._compress = compress

    def persistent_id(self, obj: Any) -> int | None:
        if not isinstance(obj, torch.Tensor) or not _neutral_tensor(obj):
            return None
        if id(obj) not in self._ids:
            self._ids[id(obj)] = (len(self.tensors), obj)
            self.tensors.append(encode_tensor(obj, compress=self._compress))
        return self._ids[id(obj)][0]


def _pickle(obj: Any, compress: bool | None) -> values_pb2.Pickled:
    buf = io.BytesIO()
    pickler = _TensorPickler(buf, compress)
    pickler.dump(obj)
    tp = type(obj)
    return values_pb2.Pickled(
        data=buf.getvalue(), tensors=pickler.tensors, type_name=f"{tp.__module__}.{tp.__qualname__}"
    )


def import_reference(ref: values_pb2.Reference) -> Any:
    """Imports a Reference's module and walks its qualname. Trusts the sender: a server passes its own."""
    obj: Any = importlib.import_module(ref.module)
    for part in filter(None, ref.qualname.split(".")):
        obj = getattr(obj, part)
    return obj


def from_value(
    msg: values_pb2.Value,
    *,
    unpickler: Callable[..., Any] = safe_loads,
    resolve_reference: Resolver | None = None,
    resolve_model: Resolver | None = None,
) -> Any:
    """The Python object for a Value message (inverse of to_value).

    unpickler(data, persistent_load=...) loads Pickled values; the default refuses globals outside
    tether.safe_pickle's default allow-list. resolve_reference(Reference) and resolve_model(ModelReference)
    turn references into objects; without one such a value raises ValueError (a client passes
    import_reference, a server its policy's checked resolver).
    """
    kind = msg.WhichOneof("kind")

    def convert(item: values_pb2.Value) -> Any:
        return from_value(
            item, unpickler=unpickler, resolve_reference=resolve_reference, resolve_model=resolve_model
        )

    if kind == "tensor":
        return decode_tensor(msg.tensor)
    if kind in ("int_value", "double_value", "string_value", "bool_value", "bytes_value"):
        return getattr(msg, kind)
    if kind == "null_value":
        return None
    if kind == "list_value":
        return [convert(x) for x in msg.list_value.items]
    if kind == "tuple_value":
        return tuple(convert(x) for x in msg.tuple_value.items)
    if kind == "map_value":
        return {convert(e.key): convert(e.value) for e in msg.map_value.entries}
    if kind == "shape_value":
        return torch.Size(msg.shape_value.dims)
    if kind == "data_type_value":
        if msg.data_type_value not in _TORCH_DTYPES:
            raise ValueError(
                f"unknown data_type_value {msg.data_type_value}; the sender is newer than tether"
            )
        return _TORCH_DTYPES[msg.data_type_value]
    if kind == "big_int_value":
        return int(msg.big_int_value)
    if kind == "ndarray_value":
        return decode_tensor(msg.ndarray_value).numpy()
    if kind == "reference":
        ref = msg.reference
        if resolve_reference is None:
            raise ValueError(
                f"received a reference to {ref.module}{'.' if ref.qualname else ''}{ref.qualname} but no "
                f"resolver was given: pass resolve_reference=tether.values.import_reference to trust the sender"
            )
        return resolve_reference(ref)
    if kind == "model_reference":
        if resolve_model is None:
            raise ValueError(
                f"received a reference to model {msg.model_reference.name!r} but no model resolver"
            )
        return resolve_model(msg.model_reference)
    if kind == "pickled":
        tensors, decoded = msg.pickled.tensors, {}

        def persistent_load(pid: Any) -> torch.Tensor:  # one tensor per id, however often it is referenced
            if type(pid) is not int or not 0 <= pid < len(tensors):
                raise ValueError(f"pickled value refers to tensor {pid!r}, but only {len(tensors)} were sent")
            if pid not in decoded:
                decoded[pid] = decode_tensor(tensors[pid])
            return decoded[pid]

        return unpickler(msg.pickled.data, persistent_load=persistent_load)
    raise ValueError("empty Value message (no kind set); the sender is broken or newer than tether")


def to_value_map(values: Mapping[str, Any], **options: Any) -> values_pb2.ValueMap:
    """A ValueMap of named values; options as for to_value."""
    return values_pb2.ValueMap(values={name: to_value(v, **options) for name, v in values.items()})


def from_value_map(
    msg: values_pb2.ValueMap | Mapping[str, values_pb2.Value], **options: Any
) -> dict[str, Any]:
    """A dict from a ValueMap (or a proto map<string, Value> field); options as for from_value."""
    entries = msg.values if isinstance(msg, values_pb2.ValueMap) else msg
    return {name: from_value(v, **options) for name, v in entries.items()}


# ------------------------------------------------------------------------ named values on the wire, chunked
# A ValueMap, a JobResult and the values of a LocalCall / LocalResult share one wire form (a map<string,
# Value> at field 1), so one encoder serves all. Top-level tensors are framed by hand around a view of
# their memory, so a large result is copied once (into its chunks) on the way out, and once (into one
# buffer its tensors then share) on the way in.

_KEY, _VALUE, _TENSOR, _DATA = b"\x0a", b"\x12", b"\x0a", b"\x1a"  # field tags of length-delimited fields


def varint(n: int) -> bytes:
    """`n` as a protobuf varint (for messages framed by hand)."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    """The varint at `pos` of `view`, and the position after it."""
    result = shift = 0
    while True:
        if pos >= len(view) or shift > 63:
            raise ValueError("truncated or corrupt message")
        byte = view[pos]
        result |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return result, pos


def _framed(tag: bytes, *parts: bytes | memoryview) -> list[bytes | memoryview]:
    return [tag + varint(sum(len(p) for p in parts)), *parts]


def encode_value_map(named: Mapping[str, Any], **options: Any) -> list[bytes | memoryview]:
    """The serialized ValueMap of `named` (also a valid JobResult) as pieces for split_chunks.

    Tensor pieces are views of the tensors' memory (kept alive by the views): send them before changing
    the tensors. Options as for to_value.
    """
    pieces: list[bytes | memoryview] = []
    for name, obj in named.items():
        if not (isinstance(obj, torch.Tensor) and _neutral_tensor(obj)):
            entry = values_pb2.ValueMap(values={name: to_value(obj, **options)})
            pieces.append(entry.SerializeToString())
            continue
        head, data = _tensor_parts(obj, options.get("compress"))
        tensor = [head.SerializeToString(), *_framed(_DATA, data)]
        value = _framed(_TENSOR, *tensor)
        key = _framed(_KEY, name.encode())
        pieces += _framed(_KEY, *key, *_framed(_VALUE, *value))
    return pieces


def decode_value_map(data: bytes | bytearray | memoryview, **options: Any) -> dict[str, Any]:
    """The named values of a serialized ValueMap / JobResult (inverse of encode_value_map).

    Top-level tensors in a writable buffer (join_chunks returns one) use it in place: they share it, so
    it lives as long as any of them. Options as for from_value.
    """
    out = {}
    for number, wire, entry in _fields(memoryview(data).cast("B")):
        if number != 1 or wire != 2:
            continue  # another field (JobResult has more): skipped, as protobuf skips unknown fields
        name, value = _entry(entry)
        fast = _fast_tensor(value)
        out[name] = fast if fast is not None else from_value(values_pb2.Value.FromString(value), **options)
    return out


def _fields(view: memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of a message: varints as int, length-delimited as memoryview."""
    pos = 0
    while pos < len(view):
        tag, pos = read_varint(view, pos)
        if tag & 7 == 0:
            value, pos = read_varint(view, pos)
        elif tag & 7 == 2:
            size, pos = read_varint(view, pos)
            value, pos = view[pos : pos + size], pos + size
            if pos > len(view):
                raise ValueError("truncated or corrupt message")
        elif tag & 7 in (1, 5):  # fixed64, fixed32
            width = 8 if tag & 7 == 1 else 4
            value, pos = view[pos : pos + width], pos + width
        else:
            raise ValueError(f"unexpected wire type {tag & 7}")
        yield tag >> 3, tag & 7, value


def _entry(view: memoryview) -> tuple[str, memoryview]:
    name, value = "", memoryview(b"")
    for number, _, field_value in _fields(view):
        if number == 1:
            name = bytes(field_value).decode()
        elif number == 2:
            value = field_value
    return name, value


def _fast_tensor(value: memoryview) -> torch.Tensor | None:
    """The tensor of a Value that holds one, read without copying its data; None for other kinds."""
    if len(value) == 0 or value[0] != 0x0A:
        return None
    fields = list(_fields(value))
    if len(fields) != 1:
        return None
    data_type, shape, compression, data = 0, [], 0, memoryview(b"")
    for number, wire, field_value in _fields(fields[0][2]):
        if number == 1:
            data_type = field_value
        elif number == 2 and wire == 2:  # packed
            pos = 0
            while pos < len(field_value):
                size, pos = read_varint(field_value, pos)
                shape.append(size)
        elif number == 2:
            shape.append(field_value)
        elif number == 3:
            data = field_value
        elif number == 4:
            compression = field_value
    shape = [d - (1 << 64) if d >= 1 << 63 else d for d in shape]  # int64 on the wire
    return _tensor_from(data_type, tuple(shape), compression, data)


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
