"""tether.safe_pickle: only allow-listed globals load; a malicious pickle is refused and runs nothing."""

from __future__ import annotations

import collections
import io
import os
import pickle

import cloudpickle
import numpy as np
import pytest
import torch
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast

from tether.safe_pickle import DEFAULT_ALLOW_LIST, PickleAllowList, UnsafePickleError, safe_loads


class _SystemCall:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_classic_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    for dumps in (pickle.dumps, cloudpickle.dumps):
        with pytest.raises(UnsafePickleError) as info:
            safe_loads(dumps(_SystemCall(marker)))
        assert "system" in info.value.name and "allow-list" in str(info.value)
        assert not marker.exists()
    pickle.loads(pickle.dumps(_SystemCall(marker)))  # the unrestricted loader would have run it
    assert marker.exists()


def test_refusal_is_a_pickle_error_naming_the_global():
    with pytest.raises(pickle.UnpicklingError, match=r"'builtins\.eval'"):
        safe_loads(pickle.dumps(eval))


@pytest.mark.parametrize(
    "name", ["builtins.getattr", "builtins.__import__", "subprocess.Popen", "torch.load", "io.open"]
)
def test_dangerous_globals_are_not_in_the_default_list(name):
    module, attr = name.rsplit(".", 1)
    assert not DEFAULT_ALLOW_LIST.allows(module, attr)


def test_torch_values_load():
    t = torch.randn(3, 4).to(torch.bfloat16)
    p = torch.nn.Parameter(torch.randn(2))
    out = safe_loads(pickle.dumps([t, t[1:], p, torch.Size([2, 3]), torch.float16, torch.device("cpu")]))
    assert torch.equal(out[0], t) and torch.equal(out[1], t[1:])
    assert isinstance(out[2], torch.nn.Parameter) and torch.equal(out[2], p)
    assert out[3:] == [torch.Size([2, 3]), torch.float16, torch.device("cpu")]


def test_tensor_storage_goes_through_torchs_weights_only_loader():
    # torch pickles storages as torch.save bytes loaded by torch.load(weights_only=False); a storage blob
    # holding anything but tensors must be refused too.
    class Storage:
        def __reduce__(self):
            blob = io.BytesIO()
            torch.save(_SystemCall("/tmp/tether_storage_pwned"), blob, _use_new_zipfile_serialization=False)
            return (torch.storage._load_from_bytes, (blob.getvalue(),))

    with pytest.raises(pickle.UnpicklingError):
        safe_loads(pickle.dumps(Storage()))
    assert not os.path.exists("/tmp/tether_storage_pwned")


def test_model_outputs_and_caches_load():
    cache = DynamicCache()
    cache.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), 0)
    logits = torch.randn(1, 3, 5)
    out = safe_loads(cloudpickle.dumps(CausalLMOutputWithPast(logits=logits, past_key_values=cache)))
    assert type(out) is CausalLMOutputWithPast and torch.equal(out.logits, logits)
    assert type(out.past_key_values) is DynamicCache
    assert type(safe_loads(pickle.dumps(BaseModelOutput(last_hidden_state=logits)))) is BaseModelOutput


def test_torch_return_types_load():
    out = safe_loads(pickle.dumps(torch.tensor([[1.0, 3.0]]).max(dim=-1)))
    assert out.indices.item() == 1


def test_containers_and_numpy_load():
    data = [
        collections.OrderedDict(a=1),
        collections.defaultdict(list, b=[2]),
        {1, 2},
        frozenset([3]),
        slice(1, None, 2),
        Ellipsis,
        complex(1, 2),
        np.arange(4, dtype=np.float32),
        np.float32(1.5),
        np.dtype("int64"),
    ]
    out = safe_loads(pickle.dumps(data))
    assert out[:7] == data[:7] and type(out[1]) is collections.defaultdict
    assert np.array_equal(out[7], data[7]) and out[8] == data[8] and out[9] == data[9]


def test_the_caller_owns_the_allow_list():
    payload = pickle.dumps(collections.Counter("aab"))
    assert safe_loads(payload) == collections.Counter("aab")
    with pytest.raises(UnsafePickleError, match="Counter"):
        safe_loads(payload, allow=PickleAllowList())
    assert safe_loads(payload, allow={"collections.Counter"})["a"] == 2
    extended = PickleAllowList().with_names("collections.Counter")
    assert safe_loads(payload, allow=extended)["b"] == 1


def test_subclass_rule_does_not_cover_other_modules_or_dunders():
    assert DEFAULT_ALLOW_LIST.allows("transformers.modeling_outputs", "CausalLMOutputWithPast")
    assert not DEFAULT_ALLOW_LIST.allows("transformers.modeling_outputs", "dataclass")  # not a subclass
    assert not DEFAULT_ALLOW_LIST.allows("transformers.modeling_outputs", "__builtins__")
    assert not DEFAULT_ALLOW_LIST.allows("transformers_evil", "ModelOutput")


def test_persistent_ids_need_a_loader():
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return 0 if obj == "tensor-0" else None

    buf = io.BytesIO()
    Pickler(buf).dump(["tensor-0"])
    with pytest.raises(pickle.UnpicklingError):
        safe_loads(buf.getvalue())
    assert safe_loads(buf.getvalue(), persistent_load=lambda pid: f"loaded {pid}") == ["loaded 0"]
