"""tether.values: Python values <-> tether.v1 Value messages, bit-exact, with lz4 only where it pays."""

from __future__ import annotations

import collections
import ctypes
import gc
import io
import math
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from tether import tensor_codec, values, wire
from tether.safe_pickle import UnsafePickleError
from tether.v1 import jobs_pb2, values_pb2

ALL_DTYPES = sorted(tensor_codec.DTYPES, key=str)


def roundtrip(obj, **options):
    msg = to_wire(values.to_value(obj, **options))
    return values.from_value(msg, resolve_reference=values.import_reference)


def to_wire(msg: values_pb2.Value) -> values_pb2.Value:
    return values_pb2.Value.FromString(msg.SerializeToString())


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and bytes(tensor_codec.host_bytes(a.contiguous())) == bytes(tensor_codec.host_bytes(b.contiguous()))
    )


def random_tensor(dtype: torch.dtype, shape=(3, 5)) -> torch.Tensor:
    """Random bit patterns (NaN payloads included); bools are 0/1."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, dtype=torch.bool)
    itemsize = dtype.itemsize
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * itemsize), dtype=torch.uint8)
    return raw.view(dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_roundtrips_bit_exact(dtype):
    t = random_tensor(dtype)
    out = roundtrip(t)
    assert same_bits(out, t)


@pytest.mark.parametrize(
    "make",
    [
        lambda t: t.T,  # transposed
        lambda t: t[::2, 1::3],  # strided slice
        lambda t: t[1],  # view with a storage offset
        lambda t: t[0, 0],  # 0-d
        lambda t: t[:0],  # empty
        lambda t: t[:1].expand(4, -1),  # stride 0
    ],
    ids=["transpose", "strided", "offset", "scalar", "empty", "expanded"],
)
def test_views_and_non_contiguous_tensors(make):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    view = make(base)
    out = roundtrip(view)
    assert out.shape == view.shape and torch.equal(out, view)
    assert out.is_contiguous()


def test_tensor_is_detached_and_decoded_tensor_is_writable_without_warnings():
    t = torch.randn(4, 4, requires_grad=True) * 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = roundtrip(t)
        big = roundtrip(torch.zeros(1 << 16))  # lz4 path
    assert not out.requires_grad and torch.equal(out, t.detach())
    out[0, 0] = 7.0  # must not touch anything shared
    big[0] = 1.0
    assert big[0] == 1.0


def test_a_leaf_that_requires_grad_arrives_as_one():
    x = torch.randn(3, 2, requires_grad=True)
    out = roundtrip(x)
    assert out.requires_grad and out.is_leaf and out.dtype == x.dtype and torch.equal(out, x.detach())
    out.sum().backward()
    assert torch.equal(out.grad, torch.ones(3, 2))
    assert not roundtrip(torch.ones(2, requires_grad=True) * 2).requires_grad  # results of autograd: detached
    assert not roundtrip(torch.ones(2)).requires_grad
    fast = wire.decode_value_map(bytearray(b"".join(wire.encode_value_map({"x": x}))))  # the framed fast path
    assert fast["x"].requires_grad and fast["x"].is_leaf and torch.equal(fast["x"], x.detach())


def test_conjugate_and_negative_views_are_resolved():
    z = torch.randn(3, dtype=torch.complex64)
    assert torch.equal(roundtrip(z.conj()), z.conj().resolve_conj())


def test_lz4_used_only_where_it_pays():
    compressible = torch.zeros(1 << 16, dtype=torch.float32)  # 256 KiB
    random_like = torch.randn(1 << 16, dtype=torch.float32)
    small = torch.zeros(1000, dtype=torch.float32)  # 4 KB, below the threshold
    assert tensor_codec.encode_tensor(compressible).compression == values_pb2.COMPRESSION_LZ4
    assert tensor_codec.encode_tensor(random_like).compression == values_pb2.COMPRESSION_NONE
    assert tensor_codec.encode_tensor(small).compression == values_pb2.COMPRESSION_NONE
    assert tensor_codec.encode_tensor(small, compress=True).compression == values_pb2.COMPRESSION_LZ4
    assert tensor_codec.encode_tensor(compressible, compress=False).compression == values_pb2.COMPRESSION_NONE
    # forced compression of incompressible data still sends raw bytes
    assert tensor_codec.encode_tensor(torch.randn(4096), compress=True).compression == values_pb2.COMPRESSION_NONE
    for t in (compressible, random_like, small):
        assert torch.equal(tensor_codec.decode_tensor(tensor_codec.encode_tensor(t, compress=True)), t)


def test_lz4_payload_is_a_raw_block_of_the_stated_size():
    t = torch.arange(1 << 15, dtype=torch.int64) // 100  # token-id-like, compressible
    msg = tensor_codec.encode_tensor(t)
    assert msg.compression == values_pb2.COMPRESSION_LZ4 and len(msg.data) < t.numel() * 8
    import lz4.block

    assert lz4.block.decompress(msg.data, uncompressed_size=t.numel() * 8) == t.numpy().tobytes()


@pytest.mark.parametrize(
    "obj",
    [
        None,
        True,
        False,
        0,
        -(1 << 63),
        (1 << 63) - 1,
        1 << 100,
        -(1 << 70),
        1.5,
        float("inf"),
        "héllo",
        b"\x00\xff",
        [],
        (),
        {},
        [1, (2, 3), {"a": [None]}],
        (1,),
        {"b": 1, "a": 2, 3: "int key", (1, 2): "tuple key"},
        torch.Size([2, 3]),
        torch.bfloat16,
    ],
    ids=repr,
)
def test_python_values_roundtrip_with_their_types(obj):
    out = roundtrip(obj)
    assert out == obj and type(out) is type(obj)
    if isinstance(obj, dict):
        assert list(out) == list(obj)  # insertion order kept


def test_nan_and_nested_tensors():
    out = roundtrip({"x": (torch.ones(2), [float("nan")])})
    assert torch.equal(out["x"][0], torch.ones(2)) and math.isnan(out["x"][1][0])
    assert isinstance(out["x"], tuple)


def test_numpy_arrays_roundtrip_as_numpy():
    for arr in (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([True, False]), np.arange(10)[::-2]):
        out = roundtrip(arr)
        assert type(out) is np.ndarray and out.dtype == arr.dtype and np.array_equal(out, arr)


def test_modules_and_importable_functions_travel_as_references():
    msg = values.to_value(torch.nn.functional.gelu)
    assert msg.WhichOneof("kind") == "reference"
    assert roundtrip(torch.nn.functional.gelu) is torch.nn.functional.gelu
    assert roundtrip(math) is math
    assert roundtrip(collections.OrderedDict) is collections.OrderedDict
    with pytest.raises(ValueError, match="resolve_reference"):
        values.from_value(values.to_value(math))


def test_model_output_is_pickled_with_neutral_tensors():
    logits = torch.randn(1, 3, 1000)
    out_obj = CausalLMOutputWithPast(logits=logits, hidden_states=(logits, logits))
    msg = values.to_value(out_obj)
    assert msg.WhichOneof("kind") == "pickled"
    assert len(msg.pickled.tensors) == 1  # the same tensor is sent once
    assert len(msg.pickled.data) < 2000  # tensor bytes are not inside the pickle
    assert msg.pickled.type_name == "transformers.modeling_outputs.CausalLMOutputWithPast"
    out = roundtrip(out_obj)
    assert type(out) is CausalLMOutputWithPast and torch.equal(out.logits, logits)
    assert out.hidden_states[0] is out.hidden_states[1]


def test_neutral_type_subclasses_are_pickled_or_degraded():
    Point = collections.namedtuple("Point", "x y")
    od = collections.OrderedDict(a=1)
    assert type(roundtrip(od)) is collections.OrderedDict
    assert roundtrip(Point(1, 2), allow_pickle=False) == (1, 2)
    assert type(roundtrip(od, allow_pickle=False)) is dict


class _Opaque:
    pass


def test_no_pickle_means_type_error_naming_the_type():
    with pytest.raises(TypeError, match="_Opaque"):
        values.to_value(_Opaque(), allow_pickle=False)


def test_default_hook_and_model_reference():
    sentinel = object()
    msg = values.to_value(
        {"m": sentinel},
        default=lambda o: values_pb2.Value(model_reference=values_pb2.ModelReference(name="tiny")),
    )
    out = values.from_value(msg, resolve_model=lambda ref: f"model:{ref.name}")
    assert out == {"m": "model:tiny"}
    with pytest.raises(ValueError, match="tiny"):
        values.from_value(msg)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/tether_values_pwned",))


def test_pickled_values_load_through_the_restricted_unpickler(tmp_path):
    msg = values.to_value(_Evil())
    with pytest.raises(UnsafePickleError, match="system"):
        values.from_value(to_wire(msg))
    assert not os.path.exists("/tmp/tether_values_pwned")


def test_value_maps():
    named = {"h": torch.ones(2, 2), "n": 3}
    out = values.from_value_map(
        values_pb2.ValueMap.FromString(values.to_value_map(named).SerializeToString())
    )
    assert out.keys() == named.keys() and torch.equal(out["h"], named["h"]) and out["n"] == 3


@pytest.mark.filterwarnings("ignore:.*quantize")
def test_unsupported_tensors_fall_back_to_pickle():
    q = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8)
    assert values.to_value(q).WhichOneof("kind") == "pickled"
    with pytest.raises(TypeError, match="quint8"):
        tensor_codec.encode_tensor(q)


def test_corrupt_tensor_messages_are_rejected():
    msg = tensor_codec.encode_tensor(torch.ones(4))
    msg.data = msg.data[:-1]
    with pytest.raises(ValueError, match="needs 16 bytes"):
        tensor_codec.decode_tensor(msg)
    with pytest.raises(ValueError, match="empty Value"):
        values.from_value(values_pb2.Value())


@pytest.mark.parametrize("size", [0, 1, wire.CHUNK_SIZE, 3 * wire.CHUNK_SIZE + 5])
def test_chunks_split_and_join(size):
    data = os.urandom(size)
    chunks = list(wire.split_chunks(data))
    assert all(len(c.data) <= wire.CHUNK_SIZE for c in chunks)
    assert len(chunks) == max(1, -(-size // wire.CHUNK_SIZE))
    stream = iter([*chunks, jobs_pb2.Chunk(data=b"next message")])
    assert wire.join_chunks(stream) == data
    assert next(stream).data == b"next message"  # reading stopped at the last chunk


def test_join_chunks_rejects_gaps_and_truncation():
    chunks = list(wire.split_chunks(b"x" * 10, chunk_size=4))
    with pytest.raises(ValueError, match="does not follow"):
        wire.join_chunks([chunks[0], chunks[2]])
    with pytest.raises(ValueError, match="ended after 8 of 10"):
        wire.join_chunks(chunks[:2])


def test_functions_travel_by_public_name_and_are_never_pickled():
    def user_fn(x):
        return x

    gelu = values.to_value(torch.nn.functional.gelu).reference  # defined in torch._C._nn
    assert (gelu.module, gelu.qualname) == ("torch.nn.functional", "gelu")
    argmax = values.to_value(torch.argmax).reference
    assert (argmax.module, argmax.qualname) == ("torch", "argmax")
    msg = values.to_value([user_fn, lambda x: x])
    kinds = [item.WhichOneof("kind") for item in msg.list_value.items]
    assert kinds == ["reference", "reference"]  # a server refuses these by name, with an allow-list error
    assert msg.list_value.items[0].reference.qualname.endswith("user_fn")


def _mixed_values() -> dict:
    return {
        "hidden": torch.randn(2, 3, 8),
        "logits_bf16": torch.randn(4, 5).to(torch.bfloat16),
        "compressible": torch.zeros(1 << 15),  # lz4
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "strided": torch.arange(20).reshape(4, 5).T,
        "n": 7,
        "text": "tokens",
        "nested": [torch.ones(2), {"k": (1, 2)}],
    }


def _assert_same(out: dict, expected: dict) -> None:
    assert out.keys() == expected.keys()
    for name, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert out[name].dtype == value.dtype and torch.equal(out[name], value), name
        elif name == "nested":
            assert torch.equal(out[name][0], value[0]) and out[name][1] == value[1]
        else:
            assert out[name] == value


def test_encode_value_map_is_a_valid_value_map_and_job_result():
    named = _mixed_values()
    data = b"".join(wire.encode_value_map(named))
    _assert_same(values.from_value_map(values_pb2.ValueMap.FromString(data)), named)
    result = jobs_pb2.JobResult.FromString(data)
    assert set(result.saved) == set(named)
    # and protobuf's own serialization decodes with the fast reader
    _assert_same(wire.decode_value_map(values.to_value_map(named).SerializeToString()), named)


@pytest.mark.parametrize("chunk_size", [7, 1000, wire.CHUNK_SIZE])
def test_named_values_through_chunks(chunk_size):
    named = _mixed_values()
    chunks = list(wire.split_chunks(wire.encode_value_map(named), chunk_size))
    assert all(len(c.data) <= chunk_size for c in chunks)
    assert sum(len(c.data) for c in chunks) == chunks[0].total_size
    _assert_same(wire.decode_value_map(wire.join_chunks(iter(chunks))), named)


def test_received_tensors_share_the_joined_buffer_and_are_writable():
    big = torch.randn(1 << 16)  # incompressible: sent raw
    data = b"".join(wire.encode_value_map({"h": big}))
    shared = 0
    for shift in range(4):  # at one of these shifts the data is aligned and used in place
        buffer = bytearray(shift) + bytearray(data)
        start = ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer))
        out = wire.decode_value_map(memoryview(buffer)[shift:])
        shared += start <= out["h"].data_ptr() < start + len(buffer)
        out["h"][0] = 123.0  # writable, no warning
        assert torch.equal(out["h"][1:], big[1:])
    assert shared >= 1


def test_misaligned_tensor_data_is_copied_to_aligned_memory():
    named = {"x": torch.arange(4, dtype=torch.float64)}
    data = b"".join(wire.encode_value_map(named))
    for shift in range(8):  # place the message at every offset within a buffer
        buffer = bytearray(shift) + bytearray(data)
        out = wire.decode_value_map(memoryview(buffer)[shift:])
        assert out["x"].data_ptr() % 8 == 0 and torch.equal(out["x"], named["x"])


def test_encode_value_map_keeps_tensors_alive():
    pieces = wire.encode_value_map({"h": torch.full((1 << 14,), 2.0).sin()})  # no other reference
    gc.collect()
    torch.randn(1 << 16)  # reuse freed memory if any was freed
    out = wire.decode_value_map(b"".join(pieces))
    assert torch.equal(out["h"], torch.full((1 << 14,), 2.0).sin())


def test_other_top_level_fields_are_skipped():
    named = {"a": 1, "h": torch.ones(3)}
    pieces = b"".join(wire.encode_value_map(named))
    job_result_extras = jobs_pb2.JobResult(unsaved=["x"], unreached_reason="stopped").SerializeToString()
    odd_fields = b"\x10\x05", b"\x19" + bytes(8)  # a varint field, a fixed64 field
    for data in (odd_fields[0] + pieces + odd_fields[1], pieces + job_result_extras):
        out = wire.decode_value_map(data)
        assert out.keys() == named.keys() and out["a"] == 1 and torch.equal(out["h"], named["h"])


def test_fake_tensors_anywhere_in_a_value_travel_as_meta_tensors_never_read():
    from torch._subclasses.fake_tensor import FakeTensorMode

    class Holder:
        pass

    with FakeTensorMode():
        fake = torch.ones(2, 3, requires_grad=True)
        best = torch.max(fake, -1)
    holder = Holder()
    holder.h = fake
    sent = {"plain": fake, "best": best, "ordered": collections.OrderedDict(h=fake), "holder": holder}

    def trusting(data, persistent_load):  # (the test's own class travels by value)
        unpickler = pickle.Unpickler(io.BytesIO(data))
        unpickler.persistent_load = persistent_load
        return unpickler.load()

    back = values.from_value(values.to_value(sent), resolve_reference=values.import_reference, unpickler=trusting)
    assert back["plain"].is_meta and back["plain"].shape == (2, 3) and back["plain"].requires_grad
    assert type(back["best"]) is type(best) and back["best"].indices.is_meta and back["best"].values.shape == (2,)
    assert back["ordered"]["h"].is_meta and back["holder"].h.shape == (2, 3)
    assert not tensor_codec.neutral_tensor(fake)
