"""Outside objects a remote body changed: which objects travel as attributes, and merging the changes back."""

from __future__ import annotations

import torch

from tether.client.encode import _is_library
from tether.client.outside import as_namespace, is_plain_object, merge_into
from tether.values import Attributes


class Plain:
    def __init__(self):
        self.a = 1


class MyDict(dict):
    pass


class Slotted:
    __slots__ = ("a",)


def test_only_the_users_own_dict_based_objects_travel_as_attributes():
    assert is_plain_object(Plain(), _is_library)
    assert not is_plain_object(MyDict(), _is_library)  # its state is the dict, not __dict__
    assert not is_plain_object(Slotted(), _is_library)
    assert not is_plain_object(torch.nn.Linear(1, 1), _is_library)
    assert not is_plain_object([1], _is_library) and not is_plain_object(Plain, _is_library)
    assert as_namespace(Plain()) == Attributes(a=1)


def test_merge_keeps_the_callers_objects_and_unchanged_tensors():
    t = torch.ones(2)
    box = Plain()
    old = [t, {"k": 1, "gone": 2}, box]
    inner, new_t = old[1], torch.ones(2)
    merged = merge_into(old, [new_t, {"k": 3, "new": 4}, Attributes(a=5, b=6), "appended"])
    assert merged is old and old[0] is t and old[1] is inner and old[2] is box
    assert inner == {"k": 3, "new": 4} and vars(box) == {"a": 5, "b": 6} and old[3] == "appended"
    changed = merge_into([t], [torch.zeros(2)])
    assert changed[0] is not t and torch.equal(changed[0], torch.zeros(2))
    order = {"a": 1, "b": 2}
    assert list(merge_into(order, {"b": 2, "a": 1})) == ["b", "a"]  # the body's order, as a local run leaves it
    shorter = [1, 2, 3]
    assert merge_into(shorter, [1]) == [1] and shorter == [1]
