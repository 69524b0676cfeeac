"""The front door checks a program's values without paying for them: pickles call none of the globals they name
(tether.safe_pickle.check_loads), tensors are built only within a budget (program_codec.CheckedTensors)."""

from __future__ import annotations

import collections
import pickle
import tracemalloc

import lz4.block
import pytest
import torch

from tether import tiny, values
from tether.safe_pickle import Unbuilt, UnsafePickleError, check_loads, safe_loads
from tether.server.errors import InvalidProgram
from tether.server.policy import DEFAULT_POLICY
from tether.server.program_codec import CheckedTensors, decode_program
from tether.server.registry import HostedModel, wrap
from tether.v1 import program_pb2, values_pb2


class _Allocates:
    """Pickles as a call of an allowed global that allocates what its argument says."""

    def __init__(self, size: int):
        self.size = size

    def __reduce__(self):
        return bytearray, (self.size,)


class _Call:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


class _DictOf:
    def __init__(self, arg):
        self.arg = arg

    def __reduce__(self):
        return dict, (self.arg,)


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_pickle_that_asks_for_gigabytes_is_checked_not_built():
    data = pickle.dumps(_Allocates(3 << 30))
    assert len(data) < 100
    results = []
    assert _peak_bytes(lambda: results.append(check_loads(data))) < 1 << 20
    assert isinstance(results[0], Unbuilt)
    assert len(safe_loads(pickle.dumps(_Allocates(10)))) == 10  # the worker builds it (within its memory limit)


def test_check_loads_refuses_what_safe_loads_refuses():
    import os

    for loads in (check_loads, safe_loads):
        with pytest.raises(UnsafePickleError, match="os.getpid|posix.getpid"):
            loads(pickle.dumps(os.getpid))


def test_check_loads_builds_plain_data_and_calls_no_global():
    plain = {"a": [1, 2.5, (3, "x")], "s": {1, 2}, "f": frozenset({3}), "n": None, "b": b"raw"}
    assert check_loads(pickle.dumps(plain)) == safe_loads(pickle.dumps(plain)) == plain
    for value in (collections.OrderedDict(k=1), torch.Size([2, 3]), torch.float16):
        loaded = check_loads(pickle.dumps(value))
        assert loaded is Unbuilt or isinstance(loaded, Unbuilt)  # (a global named, not called: the stand-in)


def test_constructors_that_amplify_their_arguments_are_not_called():
    range_list = pickle.dumps(_Call(list, _Call(range, 10**9)))  # 10**9 items from a few bytes
    data = pickle.dumps(_DictOf(_Allocates(3 << 30)))
    for pickled in (range_list, data):
        results = []
        assert _peak_bytes(lambda pickled=pickled, results=results: results.append(check_loads(pickled))) < 1 << 20
        assert isinstance(results[0], Unbuilt)


def test_checked_tensors_build_small_ones_and_stand_in_for_large_ones():
    small = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    checked = CheckedTensors(budget=1 << 10)
    assert torch.equal(checked(values.to_value(small).tensor), small)
    n = 1 << 28  # 1 GiB of float32 zeros: an lz4 block of ~4 MiB
    bomb = values_pb2.Tensor(data_type=values_pb2.DATA_TYPE_FLOAT32, shape=[n],
                             compression=values_pb2.COMPRESSION_LZ4,
                             data=lz4.block.compress(bytes(64 << 20), store_size=False)[: 1 << 20])
    results = []
    assert _peak_bytes(lambda: results.append(checked(bomb))) < 1 << 20
    assert results[0].is_meta and results[0].shape == (n,) and results[0].dtype == torch.float32
    with pytest.raises(ValueError, match="needs 24 bytes"):
        checked(values_pb2.Tensor(data_type=values_pb2.DATA_TYPE_FLOAT32, shape=[2, 3], data=b"\0" * 8))


def _program(bindings: dict) -> program_pb2.Program:
    return program_pb2.Program(kind=program_pb2.PROGRAM_KIND_TRACE, source="y = len(x)\nout = model.output.save()\n",
                               filename="user.py", first_line=1, bindings=bindings, args=[values.to_value("hi")])


def test_the_front_doors_decode_checks_values_and_builds_none_of_a_bomb():
    hosted = HostedModel("tiny", wrap(tiny.tiny_gpt2()), None)
    bomb = values_pb2.Value(pickled=values_pb2.Pickled(data=pickle.dumps(_Allocates(3 << 30)), type_name="bytearray"))
    results = []
    peak = _peak_bytes(lambda: results.append(decode_program(_program({"x": bomb}), hosted, DEFAULT_POLICY,
                                                             checking=True)))
    decoded = results[0]
    try:
        assert peak < 16 << 20 and isinstance(decoded.bindings["x"], Unbuilt)
    finally:
        decoded.release()
    refused = values_pb2.Value(pickled=values_pb2.Pickled(data=pickle.dumps(print), type_name="builtins.print"))
    with pytest.raises(InvalidProgram, match="the value of `x` was refused"):
        decode_program(_program({"x": refused}), hosted, DEFAULT_POLICY, checking=True)
