"""Request limits checked before any work: program size, positions, value nesting and count; undecodable bytes.

Each refusal is INVALID_ARGUMENT naming the field and the limit. Imports protobuf, tether.v1 and errors only:
nothing here parses Python or decodes a value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from google.protobuf.message import DecodeError

from tether.v1 import program_pb2, values_pb2

from .errors import InvalidProgram

__all__ = ["Undecodable", "check_program", "decoded", "deserializer", "program_sources"]

_CONTAINERS = ("list_value", "tuple_value", "map_value")


class Undecodable:
    """Stands for a request message grpc could not decode (garbage bytes, invalid UTF-8, nesting past protobuf's
    limit): the servicer reports it as INVALID_ARGUMENT instead of grpc's INTERNAL "Exception deserializing"."""

    def __init__(self, type_name: str, error: Exception):
        self.type_name, self.error = type_name, error

    def refusal(self) -> InvalidProgram:
        return InvalidProgram(
            f"the server could not decode the {self.type_name} message ({self.error}): it is not a valid "
            f"{self.type_name} (corrupt bytes, text that is not UTF-8, or values nested too deeply). Send it "
            "with a tether client of a matching version."
        )


def decoded(request: Any) -> Any:
    """`request` as the servicer gets it; its refusal (InvalidProgram) raised if it could not be decoded."""
    if isinstance(request, Undecodable):
        raise request.refusal()
    return request


def deserializer(message_type) -> Callable[[bytes], object]:
    """`message_type.FromString` that returns an Undecodable instead of raising on bad bytes."""
    name = message_type.DESCRIPTOR.full_name

    def decode(data: bytes):
        try:
            return message_type.FromString(data)
        except (DecodeError, RecursionError, ValueError) as error:
            return Undecodable(name, error)

    return decode


def check_program(program: program_pb2.Program, limits: Any) -> None:
    """Refuse (InvalidProgram naming the field and the limit) a program over `limits` (the server's
    workers.Limits: max_program_bytes, max_value_depth, max_values), before any work. Every source the
    program carries counts: the body, its shipped functions and its model edits."""
    sources = program_sources(program)
    size = sum(len(source.encode()) for _, source, _, _ in sources)
    if size > limits.max_program_bytes:
        raise InvalidProgram(
            f"Program.source (with its FunctionSource.source and Edit.source) is {size} bytes, over the server's "
            f"limit of {limits.max_program_bytes} bytes (--max-program-bytes). Send less code per job: move "
            "helpers into a module the server has, or pass data as values instead of literals in the source."
        )
    for where, source, first_line, blocks in sources:
        _check_positions(where, source, first_line, blocks, limits)
    values = [*program.args, *program.kwargs.values(), *program.bindings.values()]
    for part in (*program.functions, *program.edits):
        values.extend(part.bindings.values())
    _check_values(values, limits)


def program_sources(program: program_pb2.Program) -> list[tuple[str, str, int, Iterable[program_pb2.LocalBlock]]]:
    """(field, source, first line, local() blocks) of every text a program carries: its body, shipped functions
    and model edits."""
    return [("Program", program.source, program.first_line, program.local_blocks),
            *((f"Program.functions[{i}]", fn.source, fn.first_line, fn.local_blocks)
              for i, fn in enumerate(program.functions)),
            *((f"Program.edits[{i}]", edit.source, edit.first_line, ()) for i, edit in enumerate(program.edits))]


def _check_positions(where: str, source: str, first_line: int, blocks: Iterable[program_pb2.LocalBlock],
                     limits: Any) -> None:
    """Line numbers must be consistent with the source: the first line costs as many bytes as it skips, so
    it is bounded like the text; local() blocks lie inside the source."""
    if not 0 <= first_line <= limits.max_program_bytes:
        raise InvalidProgram(
            f"{where}.first_line is {first_line}: it must be between 0 and {limits.max_program_bytes} (the "
            "server's --max-program-bytes; the line the source starts at in its file)."
        )
    first = first_line or 1
    last = first + source.count("\n")
    for i, block in enumerate(blocks):
        if not first <= block.first_line <= last or (block.last_line and not block.first_line <= block.last_line
                                                     <= last):
            raise InvalidProgram(
                f"{where}.local_blocks[{i}] spans lines {block.first_line}-{block.last_line}, outside the "
                f"source's lines {first}-{last}: positions must lie inside the source they describe."
            )


def _check_values(roots: list[values_pb2.Value], limits: Any) -> None:
    """Count values and measure their nesting without recursion (a hostile value cannot exhaust the stack)."""
    stack = [(v, 1) for v in roots]
    count = 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > limits.max_values:
            raise InvalidProgram(
                f"the program's values hold more than {limits.max_values} items (lists, tuples and dicts count "
                "each element), the server's limit: send large data as tensors."
            )
        kind = value.WhichOneof("kind")
        if kind not in _CONTAINERS:
            continue
        if depth > limits.max_value_depth:
            raise InvalidProgram(
                f"a value in the program is nested more than {limits.max_value_depth} levels deep (lists, tuples "
                "and dicts inside each other), the server's limit: flatten it."
            )
        if kind == "map_value":
            for entry in value.map_value.entries:
                stack.append((entry.key, depth + 1))
                stack.append((entry.value, depth + 1))
        else:
            stack.extend((item, depth + 1) for item in getattr(value, kind).items)
