"""The one rule for what a `local()` block is (runtime/body.py), the names a body reads and binds, and the
engine, the client and the server finding the very same blocks in one source. No model, no network."""

from __future__ import annotations

import ast
import textwrap

import pytest

from tether.client import encode
from tether.runtime import body
from tether.runtime.program import Program, block_of
from tether.server import program_texts

LOCAL = ["with tether.local():", "with local():", "with tracer.local():", "with session.local():",
         "with a.b.local():", "with open('f') as f, tether.local():", "async with x.local():",
         "async with local():"]
NOT_LOCAL = ["with tether.local(1):", "with tracer.local(block=True):", "with tether.local:",
             "with local_thing():", "with tracer.invoke():", "with x.local.y():", "with tether.locals():"]


def _with(head: str) -> ast.AST:
    """The with statement `head` opens (inside an async function, so `async with` parses)."""
    tree = ast.parse(f"async def f():\n    {head}\n        pass\n")
    return tree.body[0].body[0]


@pytest.mark.parametrize("head", LOCAL)
def test_local_blocks_are_calls_of_local_without_arguments(head):
    assert body.is_local_with(_with(head))


@pytest.mark.parametrize("head", NOT_LOCAL)
def test_other_with_statements_are_not_local_blocks(head):
    assert not body.is_local_with(_with(head))


def test_names_read_assigned_and_written():
    stmts = ast.parse(textwrap.dedent("""\
        a = b + c
        def g(p):
            q = p
        squares = [i * i for i in range(a)]
        import os.path
        del d
    """)).body
    assert body.loaded_names(stmts) == {"b", "c", "p", "i", "range", "a"}
    assert body.assigned_names(stmts) == ["a", "g", "squares", "os"]  # its own scope only
    assert body.written_names(stmts) == ["a", "g", "q", "squares", "i", "os", "d"]  # nested scopes too


SOURCE = textwrap.dedent("""\
    h = model.layer.output
    with tether.local():
        plot(h)
        with tracer.local():
            inner = 1
    with tracer.local(): note = h.shape
    with open("f") as f, local():
        seen = f
    with tether.local(1):
        runs_remotely = 2
    async def helper():
        async with session.local():
            got = h
    out = model.output.save()
""")


def test_engine_client_and_server_find_the_same_local_blocks():
    first_line = 10  # the body's first line in the user's file
    stmts = ast.parse("\n" * (first_line - 1) + SOURCE).body
    outermost = [(12, 14), (15, 15), (17, 17), (22, 22)]  # (first, last) body lines, nested blocks inside theirs

    engine = block_of(Program(kind="trace", source=SOURCE, filename="user.py", first_line=first_line))
    assert [span for span in engine.local_blocks if not any(a < span[0] <= b for a, b in outermost)] == outermost

    client = encode._Body(ast.parse(SOURCE).body, line_offset=first_line - 1)
    sent = client.local_blocks(client.remote_stores)
    assert [(b.first_line, b.last_line) for b in sent] == outermost
    assert "runs_remotely" in client.remote_stores and "plot" not in client.remote_loads
    assert "tracer" in client.remote_loads  # `with tracer.local():` reads the tracer remotely

    cut, sites = program_texts._cut_local_blocks(SOURCE, "user.py", first_line, {b.first_line: b.block_id
                                                                                 for b in sent})
    assert sorted(sites) == [first for first, _ in outermost]
    assert [sites[b.first_line].block_id for b in sent] == [b.block_id for b in sent]
    kept = ast.parse("\n" * (first_line - 1) + cut).body
    assert body.local_blocks(stmts) == [(12, 14), (14, 14), (15, 15), (17, 17), (22, 22)]
    assert list(map(body.body_span, body.local_withs(kept))) == [
        (12, 12), (15, 15), (17, 17), (22, 22)]  # each cut to its first line, nothing inside
    assert {"plot", "inner", "note", "seen", "got"}.isdisjoint(
        n.id for n in ast.walk(ast.Module(body=kept, type_ignores=[])) if isinstance(n, ast.Name)
        and isinstance(n.ctx, ast.Load))
    assert "runs_remotely" in cut
