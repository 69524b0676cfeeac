"""The supervisor's end of a replica actor's connection (server/actor_links.py), without Ray: what it closes."""

from __future__ import annotations

import os

from tether.server.actor_links import _Link


def test_closing_a_connection_twice_closes_its_pipes_once():
    """The replica closes its actor's connection when it kills the actor, and again when it is joined or
    restarted: the second close must not close file descriptors that have since been given to other files."""
    link = _Link(actor=None)
    link._end("its worker loop ended")  # (what the thread that watches the actor does as the actor ends)
    link._watched()
    link.close()
    read, write = os.pipe()  # the numbers just freed, given to another file
    try:
        link.close()
        os.fstat(read)
        os.fstat(write)
    finally:
        os.close(read)
        os.close(write)
