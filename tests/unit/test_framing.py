"""Hand-framed protobuf (tether.framing) against protobuf itself: the bytes each writer produces equal
`SerializeToString()` of the same message, and the raw readers agree with `FromString`."""

from __future__ import annotations

import pytest
import torch
from google.protobuf import timestamp_pb2

from tether import framing, tensor_codec
from tether.client.wire import ALIGN, chunk_deserializer, event_deserializer, result_buffer, split_value_map
from tether.v1 import jobs_pb2, values_pb2
from tether.values import to_value
from tether.wire import container_pieces, decode_value_map, encode_value_map

STAMP = timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=5)
CHUNKS = [(0, b"abc", 3), (0, b"", 0), (5, b"", 9), (1 << 40, b"x" * 300, (1 << 40) + 300), (0, b"\x00" * 70_000, 70_000)]


def _views(data: bytes) -> list[memoryview]:
    """`data` as several views, as a result's pieces give them."""
    view = memoryview(data)
    return [view[: len(data) // 3], view[len(data) // 3 :]] if data else []


def test_tags_come_from_the_descriptors():
    assert framing.field_tag(jobs_pb2.Chunk, "offset") == bytes([1 << 3 | 0])
    assert framing.field_tag(values_pb2.Tensor, "shape") == bytes([2 << 3 | 2])  # packed repeated int64
    assert framing.field_tag(jobs_pb2.SubmitJobResponse, "events") == bytes([4 << 3 | 2])
    assert framing.field_number(jobs_pb2.JobEvent, "result") == 6


@pytest.mark.parametrize("offset,data,total", CHUNKS)
def test_chunk(offset, data, total):
    message = jobs_pb2.Chunk(offset=offset, data=data, total_size=total).SerializeToString()
    assert b"".join(framing.chunk_parts(b"", offset, _views(data), total)) == message
    assert framing.chunk_length(offset, len(data), total) == len(message)


@pytest.mark.parametrize("offset,data,total", CHUNKS)
def test_read_result_response(offset, data, total):
    expected = jobs_pb2.ReadResultResponse(chunk=jobs_pb2.Chunk(offset=offset, data=data, total_size=total))
    assert framing.read_result_frame(offset, _views(data), total) == expected.SerializeToString()


@pytest.mark.parametrize("more", [False, True])
@pytest.mark.parametrize("offset,data,total", CHUNKS)
def test_result_event_response(offset, data, total, more):
    head = jobs_pb2.JobEvent(job_id="job-1", sequence=7, time=STAMP).SerializeToString()
    prefix = framing.result_event_prefix(head, framing.chunk_length(offset, len(data), total), more=more)
    framed = b"".join(framing.chunk_parts(prefix, offset, _views(data), total))
    event = jobs_pb2.JobEvent(job_id="job-1", sequence=7, time=STAMP,
                              result=jobs_pb2.Chunk(offset=offset, data=data, total_size=total))
    for response in (jobs_pb2.RunJobResponse, jobs_pb2.WatchJobResponse):
        expected = response(more_events=[event]) if more else response(event=event)
        assert framed == expected.SerializeToString()


def test_an_event_moved_to_more_events():
    event = jobs_pb2.JobEvent(job_id="j", sequence=3, time=STAMP, log=jobs_pb2.LogLine(text="hi " * 50))
    first = jobs_pb2.RunJobResponse(event=event).SerializeToString()
    expected = jobs_pb2.RunJobResponse(more_events=[event]).SerializeToString()
    assert b"".join(framing.as_more_events(first)) == expected


def test_submit_job_response_with_events():
    events = [jobs_pb2.WatchJobResponse(event=jobs_pb2.JobEvent(job_id="j", sequence=i, time=STAMP))
              for i in (1, 2)]
    base = jobs_pb2.SubmitJobResponse(job_id="j", state=jobs_pb2.JOB_STATE_COMPLETED, existing=True)
    framed = framing.submit_job_response(base.SerializeToString(), [e.SerializeToString() for e in events])
    base.events.extend(events)
    assert framed == base.SerializeToString()
    assert framing.submit_job_response(b"x", None) == b"x"


TENSORS = {
    "plain": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "empty": torch.zeros(0, 5),
    "scalar": torch.tensor(2.5, dtype=torch.float64),
    "int64": torch.ones(2, 1, 3, dtype=torch.int64),
    "compressible": torch.zeros(1 << 16),
    "leaf requiring grad": torch.ones(2, 3, requires_grad=True),
    "compressible leaf requiring grad": torch.zeros(1 << 16, requires_grad=True),
}


@pytest.mark.parametrize("name", TENSORS)
@pytest.mark.parametrize("compress", [False, True])
def test_value_map_tensor_entry(name, compress):
    tensor = TENSORS[name]
    head, data = tensor_codec.tensor_parts(tensor, compress)
    full = values_pb2.Tensor()
    full.CopyFrom(head)
    full.data = bytes(data)
    expected = values_pb2.ValueMap(values={name: values_pb2.Value(tensor=full)}).SerializeToString()
    assert b"".join(framing.value_map_tensor_entry(name, head, data)) == expected


@pytest.mark.parametrize("name", TENSORS)
def test_encode_value_map_is_protobufs_bytes_and_decodes_back(name):
    value = TENSORS[name]
    framed = b"".join(encode_value_map({name: value}))
    assert framed == values_pb2.ValueMap(values={name: to_value(value)}).SerializeToString()
    decoded = decode_value_map(bytearray(framed))[name]
    assert torch.equal(decoded, value)
    assert decoded.requires_grad == value.requires_grad


def test_raw_readers_agree_with_from_string():
    named = {"a": TENSORS["plain"], "b": [1, "two"], "c": TENSORS["empty"]}
    data = b"".join(encode_value_map(named))
    parsed = values_pb2.ValueMap.FromString(data)
    raw, rest = split_value_map(data)
    assert rest == b""
    assert {k: values_pb2.Value.FromString(bytes(v)) for k, v in raw.items()} == dict(parsed.values)
    result = jobs_pb2.JobResult(saved=parsed.values, unsaved=["z"]).SerializeToString()
    raw, rest = split_value_map(result)
    assert jobs_pb2.JobResult.FromString(rest).unsaved == ["z"] and set(raw) == {"a", "b", "c"}
    decoded = decode_value_map(bytearray(result))
    assert torch.equal(decoded["a"], named["a"]) and decoded["b"] == [1, "two"]


def test_fields_reads_what_protobuf_wrote():
    message = jobs_pb2.Chunk(offset=-3, data=b"xyz", total_size=1 << 50).SerializeToString()
    got = {n: v for n, _, _, _, v in framing.fields(memoryview(message))}
    parsed = jobs_pb2.Chunk.FromString(message)
    assert (framing.int64(got[1]), bytes(got[2]), framing.int64(got[3])) == (
        parsed.offset, parsed.data, parsed.total_size)


@pytest.mark.parametrize("response_type", [jobs_pb2.RunJobResponse, jobs_pb2.WatchJobResponse])
def test_event_deserializer_agrees_with_from_string(response_type):
    data = bytes(range(256)) * 300  # over RAW_MIN_BYTES: read in place
    chunk = jobs_pb2.Chunk(offset=4, data=data, total_size=len(data) + 4)
    log = jobs_pb2.JobEvent(job_id="j", sequence=9, log=jobs_pb2.LogLine(text="x"))
    message = response_type(event=jobs_pb2.JobEvent(job_id="j", sequence=8, result=chunk), more_events=[log])
    raw = event_deserializer(response_type)(message.SerializeToString())
    parsed = response_type.FromString(message.SerializeToString())
    assert (raw.event.job_id, raw.event.sequence) == (parsed.event.job_id, parsed.event.sequence)
    got = raw.event.result
    assert (got.offset, bytes(got.data), got.total_size) == (chunk.offset, chunk.data, chunk.total_size)
    assert list(raw.more_events) == list(parsed.more_events)


def test_chunk_deserializer_agrees_with_from_string():
    chunk = jobs_pb2.Chunk(offset=0, data=b"q" * 70_000, total_size=70_000)
    message = jobs_pb2.ReadResultResponse(chunk=chunk).SerializeToString()
    raw = chunk_deserializer(jobs_pb2.ReadResultResponse)(message).chunk
    assert (raw.offset, bytes(raw.data), raw.total_size) == (chunk.offset, chunk.data, chunk.total_size)


@pytest.mark.parametrize("name_length", [1, 7, 30])
def test_a_large_result_assembled_in_its_buffer_decodes_in_place_aligned(name_length):
    tensor = torch.arange(300_000, dtype=torch.float32)  # > 1 MiB: an uninitialized, aligned buffer
    data = b"".join(encode_value_map({"t" * name_length: tensor, "rest": [1, 2]}))
    buffer = result_buffer(len(data), data[:1000])  # (placed from the first chunk)
    assert len(buffer) == len(data) and not buffer.readonly
    for offset in range(0, len(data), 1 << 16):  # every byte written by a chunk before it is read
        buffer[offset : offset + (1 << 16)] = data[offset : offset + (1 << 16)]
    decoded = decode_value_map(buffer)
    got = decoded["t" * name_length]
    assert torch.equal(got, tensor) and decoded["rest"] == [1, 2]
    assert got.data_ptr() % ALIGN == 0
    start = torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()
    assert start <= got.data_ptr() < start + len(buffer)  # the buffer's own memory: no copy


@pytest.mark.parametrize("n", [0, 1, 127, 128, (1 << 14) - 1, 1 << 14, 1 << 20, (1 << 63) - 1, (1 << 64) - 1])
def test_varint_and_its_size(n):
    written = framing.varint(n)
    assert framing.varint_size(n) == len(written)
    assert framing.read_varint(memoryview(b"\x05" + written), 1) == (n, 1 + len(written))
    if n:  # (protobuf leaves a zero out)
        assert written == jobs_pb2.Chunk(total_size=n if n < 1 << 63 else n - (1 << 64)).SerializeToString()[1:]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (type(b) is torch.Tensor and (a.dtype, a.shape, a.requires_grad) == (b.dtype, b.shape, b.requires_grad)
                and torch.equal(a.detach(), b.detach()))
    if type(a) in (list, tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if type(a) is dict:
        return type(b) is dict and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


_BATCH = torch.randn(16, 1, 49152)
CONTAINERS = {
    "per-step saves": [torch.randn(49152) for _ in range(4)],
    "views of one batch": [_BATCH[i, -1] for i in range(16)],
    "scalars among tensors": ([torch.randn(3, 20000), 1, "a", None, 2.5, b"x", True, 2**70],
                              {"k": torch.arange(30000), 3: (torch.ones(0), torch.randn(20000, dtype=torch.float64))}),
    "nested dicts, a transposed view": {"a": [torch.randn(20000)], "b": {"c": [torch.randn(100, 200).t()]}},
    "compressible": [torch.zeros(100000)],
    "a leaf that requires grad": [torch.randn(20000).requires_grad_()],
    "dtypes": [torch.tensor(3.0), torch.randn(40000).half(), torch.randint(0, 5, (40000,), dtype=torch.uint8),
               torch.ones(20000, dtype=torch.bool), torch.randn(20000).bfloat16()],
}


@pytest.mark.parametrize("name", CONTAINERS)
def test_a_container_of_tensors_framed_by_hand_is_protobufs_bytes_and_decodes_back(name):
    obj = CONTAINERS[name]
    pieces = container_pieces(obj, copy=lambda t: True)
    assert pieces is not None
    assert b"".join(bytes(p) for p in pieces) == to_value(obj).SerializeToString()
    back = decode_value_map(b"".join(bytes(p) for p in framing.value_map_entry("x", pieces)))["x"]
    assert _same(obj, back)


def test_large_tensors_in_a_container_are_read_in_place_and_framed_as_views():
    obj = {"steps": [torch.randn(20000) for _ in range(3)], "n": 3}
    pieces = container_pieces(obj)
    assert sum(isinstance(p, memoryview) for p in pieces) == 3  # each tensor's data uncopied
    buffer = bytearray(b"".join(bytes(p) for p in framing.value_map_entry("x", pieces)))
    back = decode_value_map(buffer)["x"]
    assert _same(obj, back)
    start = torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()
    for sent, got in zip(obj["steps"], back["steps"]):
        offset = bytes(buffer).find(sent.numpy().tobytes())
        if offset % sent.element_size() == 0:  # aligned data is used in place: no copy on the way in either
            assert got.data_ptr() == start + offset


def test_only_plain_containers_with_enough_tensor_data_are_framed_by_hand():
    assert container_pieces([torch.randn(10)]) is None  # protobuf is faster for little data
    assert container_pieces([object(), torch.randn(100000)]) is None  # anything else: to_value decides
    assert container_pieces({(1, 2): torch.randn(100000)}) is None  # a key that is not a plain scalar
    assert container_pieces(torch.randn(100000)) is not None  # (a bare tensor is framed by encode_value_map)
