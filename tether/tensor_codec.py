"""Tensors to and from tether.v1 Tensor messages: dtype, shape and raw little-endian bytes, lz4 where it pays.

Imports torch, lz4 and tether.v1 only; `values` and `wire` build on it.
"""

from __future__ import annotations

import ctypes
import sys
import warnings
from typing import Any

import lz4.block
import torch
from torch._subclasses.fake_tensor import FakeTensor

from tether.v1 import values_pb2

__all__ = ["COMPRESS_MIN_BYTES", "DTYPES", "TORCH_DTYPES", "decode_tensor", "encode_tensor", "host_bytes",
           "meta_like", "neutral_tensor", "tensor_from", "tensor_parts", "tensor_size", "worth_compressing"]

COMPRESS_MIN_BYTES = 64 << 10  # bytes: smaller tensors are never compressed
_SAMPLE_PIECES, _SAMPLE_PIECE_BYTES = 4, 16 << 10  # a 64 KiB sample, from 4 places in the tensor
_MIN_SAMPLE_RATIO = 0.9  # compress only if the sample shrinks below this fraction
_LZ4_MAX_INPUT = 0x7E000000  # bytes: LZ4_MAX_INPUT_SIZE
_SMALL_COPY_BYTES = 64 << 10  # bytes: read-only data up to this size is copied into a bytearray it then owns


def _dtype_table() -> dict[torch.dtype, int]:
    """DATA_TYPE_<NAME> <-> torch.<name>, for every name this torch has."""
    table = {}
    for enum_name, number in values_pb2.DataType.items():
        dtype = getattr(torch, enum_name.removeprefix("DATA_TYPE_").lower(), None)
        if isinstance(dtype, torch.dtype):
            table[dtype] = number
    return table


DTYPES: dict[torch.dtype, int] = _dtype_table()
TORCH_DTYPES: dict[int, torch.dtype] = {number: dtype for dtype, number in DTYPES.items()}

def _check_little_endian() -> None:
    if sys.byteorder != "little":
        raise NotImplementedError("tether's wire format is little-endian; big-endian hosts are not supported")


def host_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy view of a contiguous CPU tensor's bytes; the view keeps the tensor alive."""
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return memoryview(b"")
    array = (ctypes.c_char * nbytes).from_address(t.data_ptr())
    array.keep_alive = t
    return memoryview(array).cast("B")


def worth_compressing(raw: memoryview) -> bool:
    """lz4 only where it pays: a 64 KiB sample from 4 places must shrink below 90%."""
    n = len(raw)
    if n < COMPRESS_MIN_BYTES or n > _LZ4_MAX_INPUT:
        return False
    step = n // _SAMPLE_PIECES
    sample = b"".join(raw[i * step : i * step + _SAMPLE_PIECE_BYTES] for i in range(_SAMPLE_PIECES))
    return len(lz4.block.compress(sample, store_size=False)) < _MIN_SAMPLE_RATIO * len(sample)


def tensor_parts(t: torch.Tensor, compress: bool | None) -> tuple[values_pb2.Tensor, bytes | memoryview]:
    """A Tensor message without its data, and the data: a view of the tensor's memory or lz4 bytes."""
    _check_little_endian()
    number = DTYPES.get(t.dtype)
    if number is None:
        raise TypeError(
            f"cannot send a {t.dtype} tensor as a neutral tensor: tether supports {_dtype_names()}"
        )
    if t.layout is not torch.strided or t.is_meta:
        raise TypeError(f"cannot send a {t.layout} {t.device.type} tensor: it has no dense data to send")
    requires_grad = _leaf_requiring_grad(t)  # an activation's graph cannot travel: it arrives detached
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()  # also materializes expanded / strided views
    raw = host_bytes(t)
    head = values_pb2.Tensor(data_type=number, shape=t.shape, compression=values_pb2.COMPRESSION_NONE,
                             requires_grad=requires_grad)
    if compress is None:
        compress = worth_compressing(raw)
    if compress and 0 < len(raw) <= _LZ4_MAX_INPUT:
        packed = lz4.block.compress(raw, store_size=False)
        if len(packed) < len(raw):
            head.compression = values_pb2.COMPRESSION_LZ4
            return head, packed
    return head, raw


def _leaf_requiring_grad(t: torch.Tensor) -> bool:
    """A leaf that requires grad, or an alias of one (`as_subclass`, as a saved tensor is)."""
    if not t.requires_grad:
        return False
    fn = t.grad_fn
    if fn is None:
        return True
    return type(fn).__name__ == "AliasBackward0" and all(
        type(f).__name__ == "AccumulateGrad" for f, _ in fn.next_functions if f is not None)


def encode_tensor(t: torch.Tensor, *, compress: bool | None = None) -> values_pb2.Tensor:
    """A Tensor message: dtype, shape and little-endian row-major bytes of `t` (detached, on the host).

    compress: None decides per tensor (lz4 when >= 64 KiB and a sample shrinks below 90%); True or
    False forces it (True still sends raw bytes when lz4 does not shrink them).
    """
    msg, data = tensor_parts(t, compress)
    msg.data = bytes(data)
    return msg


def decode_tensor(msg: values_pb2.Tensor) -> torch.Tensor:
    """A new, writable CPU tensor from a Tensor message (bit-exact inverse of encode_tensor)."""
    return tensor_from(msg.data_type, tuple(msg.shape), msg.compression, msg.data, msg.requires_grad)


def tensor_from(data_type: int, shape: tuple[int, ...], compression: int, data: Any,
                requires_grad: bool = False) -> torch.Tensor:
    """The tensor for decoded Tensor fields. `data` is bytes-like; a writable memoryview (of a buffer
    the caller hands over, see decode_value_map) is used in place when aligned, anything else is copied.
    `requires_grad`: the sender's tensor took part in autograd; this one is a leaf that requires grad."""
    out = _tensor_from(data_type, shape, compression, data)
    if requires_grad and (out.is_floating_point() or out.is_complex()):
        out.requires_grad_(True)
    return out


def tensor_size(msg: values_pb2.Tensor) -> tuple[torch.dtype, int]:
    """(dtype, bytes) of the tensor a Tensor message holds, its fields checked without decoding its data (an
    lz4 block's own size is known only once decompressed: decode_tensor checks it)."""
    return _checked_size(msg.data_type, tuple(msg.shape), msg.compression, msg.data)


def _checked_size(data_type: int, shape: tuple[int, ...], compression: int, data: Any) -> tuple[torch.dtype, int]:
    _check_little_endian()
    dtype = TORCH_DTYPES.get(data_type)
    if dtype is None:
        raise ValueError(f"tensor message has unknown data_type {data_type}; the sender is newer than tether")
    if any(size < 0 for size in shape):
        raise ValueError(f"tensor message has a negative size in its shape {list(shape)}")
    numel = 1
    for size in shape:
        numel *= size
    nbytes = numel * dtype.itemsize
    if compression not in (values_pb2.COMPRESSION_LZ4, values_pb2.COMPRESSION_NONE,
                           values_pb2.COMPRESSION_UNSPECIFIED):
        raise ValueError(f"tensor message has unknown compression {compression}")
    if compression != values_pb2.COMPRESSION_LZ4 and len(data) != nbytes:
        raise ValueError(f"tensor of shape {list(shape)} and {dtype} needs {nbytes} bytes, got {len(data)}")
    return dtype, nbytes


def _tensor_from(data_type: int, shape: tuple[int, ...], compression: int, data: Any) -> torch.Tensor:
    dtype, nbytes = _checked_size(data_type, shape, compression, data)
    if compression == values_pb2.COMPRESSION_LZ4:
        data = lz4.block.decompress(data, uncompressed_size=nbytes, return_bytearray=True)
        if len(data) != nbytes:
            raise ValueError(f"lz4 tensor data decompressed to {len(data)} bytes, expected {nbytes}")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    if isinstance(data, bytearray) or (isinstance(data, memoryview) and not data.readonly):
        out = torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(shape)
        return out if out.data_ptr() % dtype.itemsize == 0 else out.clone()  # kernels want aligned data
    if nbytes <= _SMALL_COPY_BYTES:  # one copy into a buffer the tensor keeps: ~3x cheaper than empty + copy_
        out = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)
        return out if out.data_ptr() % dtype.itemsize == 0 else out.clone()
    out = torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():  # read-only source: only read from, never handed out
        warnings.simplefilter("ignore", UserWarning)
        source = torch.frombuffer(data, dtype=torch.uint8)
    out.reshape(-1).view(torch.uint8).copy_(source)
    return out


def _dtype_names() -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in DTYPES)


def neutral_tensor(t: torch.Tensor) -> bool:
    """Whether `t` travels as a Tensor message (a supported dtype, dense, with data: not a meta tensor, nor a
    scan's FakeTensor, whose data pointer is not memory)."""
    return t.dtype in DTYPES and t.layout is torch.strided and not t.is_meta and not isinstance(t, FakeTensor)


def meta_like(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor of `t`'s shape, strides and dtype: what a tensor with no data to read travels as."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta", requires_grad=t.requires_grad)
