"""The protocol constants client and server share (tether.protocol) cover what the .proto defines."""

from tether import protocol
from tether.v1 import jobs_pb2, program_pb2


def test_every_program_kind_has_a_name_both_ways():
    kinds = {v.number for v in program_pb2.ProgramKind.DESCRIPTOR.values} - {program_pb2.PROGRAM_KIND_UNSPECIFIED}
    assert set(protocol.PROGRAM_KINDS.values()) == kinds
    assert {protocol.PROGRAM_KINDS[name] for name in protocol.PROGRAM_KIND_NAMES.values()} == kinds


def test_terminal_states_and_their_names():
    assert protocol.state_name(jobs_pb2.JOB_STATE_RUNNING) == "RUNNING"
    assert protocol.TERMINAL_NAMES == {"COMPLETED", "ERROR", "CANCELLED"}
    assert {protocol.state_name(s) for s in protocol.TERMINAL} == protocol.TERMINAL_NAMES
