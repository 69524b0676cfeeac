"""Which `local()` blocks a job need not wait for: those binding no name the code the server runs reads.

The client sends back only the names a block binds that the remote code reads (client/local.py); the server
must never go on without an answer that would have carried a value, so its own reckoning must cover every
such name: loads anywhere in the body and in every shipped function, augmented assignments included.
"""

from __future__ import annotations

import textwrap

from tether import tiny
from tether.server.policy import DEFAULT_POLICY
from tether.server.program_codec import decode_program
from tether.server.registry import HostedModel, wrap
from tether.v1 import program_pb2

HOSTED = HostedModel("net", wrap(tiny.tiny_net()))


def _needs_answer(body: str, *functions: str) -> dict[int, bool]:
    """First body line of each local() block -> whether the job must wait for its answer."""
    program = program_pb2.Program(kind=program_pb2.PROGRAM_KIND_TRACE, source=textwrap.dedent(body),
                                  filename="job.py", first_line=1, model="net", tracer_name="tracer")
    for n, source in enumerate(functions):
        text = textwrap.dedent(source)
        name = text.split("def ", 1)[1].split("(", 1)[0]
        program.functions.add(name=name, source=text, filename=f"fn{n}.py", first_line=1)
    decoded = decode_program(program, HOSTED, DEFAULT_POLICY)
    try:
        return {site.first_line: not decoded.needs_no_answer(site)
                for (filename, _), site in decoded.local_sites.items() if site.filename == "job.py"}
    finally:
        decoded.release()


def test_a_block_binding_nothing_the_job_reads_needs_no_answer():
    body = """\
    h = net.layer1.output
    with tracer.local():
        shown = h.sum()
        seen.append(float(shown))
    out = net.output.save()
    """
    assert _needs_answer(body) == {3: False}


def test_a_block_binding_a_name_the_job_reads_is_waited_for():
    body = """\
    h = net.layer1.output
    with tracer.local():
        h = h * 2
    net.layer1.output = h
    """
    assert _needs_answer(body) == {3: True}


def test_an_augmented_assignment_in_the_job_reads_the_name():
    body = """\
    with tracer.local():
        scale = 3
    total = net.layer1.output.sum()
    scale += 1
    """
    assert _needs_answer(body) == {2: True}


def test_a_name_read_only_by_a_shipped_function_is_waited_for():
    body = """\
    with tracer.local():
        factor = 2.0
    out = double(net.layer1.output).save()
    """
    function = """\
    def double(t):
        return t * factor
    """
    assert _needs_answer(body, function) == {2: True}


def test_a_name_read_only_by_another_local_block_needs_no_answer():
    body = """\
    h = net.layer1.output
    with tracer.local():
        kept = h.sum()
    with tracer.local():
        shown = kept + 1
    out = net.output.save()
    """
    assert _needs_answer(body) == {3: False, 5: False}
