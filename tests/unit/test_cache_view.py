"""CacheView is plain data: it survives the wire's value encoding and the restricted unpickler unchanged,
and navigates by path, by attribute and through aliases without a model."""

from __future__ import annotations

import torch

from tether.runtime.cache import CacheView
from tether.values import from_value, to_value


def _view() -> CacheView:
    entries = {
        "model": [[torch.ones(2), None]],
        "model.h.0": [[torch.zeros(1, 3), ((torch.ones(1, 3),), {})]],
        "model.h.1": [[torch.arange(3.0), None], [torch.arange(3.0) + 1, None]],
    }
    return CacheView(entries, {"model.layers": "model.h"})


def test_navigation_by_path_attribute_index_and_alias():
    view = _view()
    assert torch.equal(view["model.h.0"].output, torch.zeros(1, 3))
    assert torch.equal(view.model.h[0].output, view.h[0].output)
    assert torch.equal(view.model.layers[0].input, torch.ones(1, 3))
    assert [t.tolist() for t in view.model.h[-1].output] == [[0, 1, 2], [1, 2, 3]]
    assert len(view.model.h[1]) == 2 and "model.layers.1" in view and "model.h.2" not in view
    assert view.model.h.keys() == ["model.h.0", "model.h.1"]


def test_the_wire_and_the_restricted_unpickler_give_it_back_whole():
    view = _view()
    back = from_value(to_value(view))
    assert type(back) is CacheView and back.keys() == view.keys()
    assert torch.equal(back.model.layers[0].inputs[0][0], torch.ones(1, 3))
    assert all(torch.equal(a, b) for a, b in zip(back.model.h[1].output, view.model.h[1].output))
