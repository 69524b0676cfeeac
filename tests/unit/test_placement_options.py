"""Placement options of the `tether` command (which --model an option applies to), dtype names, devices,
and bfloat16 on the wire (bit-exact, special values included). No model, no network."""

from __future__ import annotations

import pytest
import torch

from tether import tensor_codec
from tether.cli import parse_args
from tether.loading import parse_dtype
from tether.placement_options import Placement
from tether.server.placement import resolve_device


def test_options_after_a_model_apply_to_it_and_before_any_model_to_all():
    args = parse_args(["serve", "--dtype", "bfloat16", "--model", "a=tiny", "--device", "cpu",
                       "--model", "b=tiny", "--dtype", "float16", "--device-map", "auto", "--model", "c=tiny"])
    assert [(m.name, m.spec, m.placement) for m in args.models] == [
        ("a", "tiny", Placement(device="cpu", dtype=torch.bfloat16)),
        ("b", "tiny", Placement(dtype=torch.float16, device_map="auto")),
        ("c", "tiny", Placement(dtype=torch.bfloat16)),
    ]


def test_deploy_takes_the_same_placement_options():
    args = parse_args(["deploy", "--host", "h:1", "m=tiny", "--replicas", "2", "--device", "auto",
                       "--dtype", "bf16", "--no-wait"])
    assert (args.model, args.replicas, args.placement, args.wait) == (
        ("m", "tiny"), 2, Placement(device="auto", dtype=torch.bfloat16), 0.0)


def test_serve_needs_a_model_and_a_known_dtype(capsys):
    with pytest.raises(SystemExit):
        parse_args(["serve", "--dtype", "bfloat16"])
    assert "at least one --model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["serve", "--model", "a=tiny", "--dtype", "int8"])
    assert "unknown dtype 'int8'" in capsys.readouterr().err


def test_a_front_door_of_a_cluster_needs_no_model():
    args = parse_args(["serve", "--ray", "auto", "--ray-namespace", "lab"])  # it serves what the cluster hosts
    assert (args.models, args.ray, args.ray_namespace) == ([], "auto", "lab")


@pytest.mark.parametrize("name, dtype", [("bfloat16", torch.bfloat16), ("torch.float16", torch.float16),
                                         ("fp32", torch.float32), (torch.bfloat16, torch.bfloat16),
                                         (None, None), ("auto", "auto")])
def test_dtype_names(name, dtype):
    assert parse_dtype(name) == dtype


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="unsupported device 'meta'"):
        resolve_device("meta")


def test_bfloat16_travels_bit_for_bit():
    bits = torch.tensor([0x0000, 0x8000, 0x0001, 0x7F7F, 0xFF7F, 0x7F80, 0xFF80, 0x7FC1, 0x3F80, 0x1234],
                        dtype=torch.int32).to(torch.int16)  # (the high ones wrap to their int16 bits)
    special = bits.view(torch.bfloat16)  # zeros, a subnormal, max, -max, +-inf, a NaN payload, 1.0
    noise = torch.randn(3, 257, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)[:, ::2]
    for tensor in (special, noise):
        back = tensor_codec.decode_tensor(tensor_codec.encode_tensor(tensor))
        assert back.dtype == torch.bfloat16 and back.shape == tensor.shape
        assert torch.equal(back.view(torch.int16), tensor.contiguous().view(torch.int16))


def test_admin_service_has_the_agreed_shape():
    from tether.v1 import admin_pb2, admin_pb2_grpc

    service = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
    assert [(m.name, m.client_streaming, m.server_streaming) for m in service.methods] == [
        ("DeployModel", False, False), ("EvictModel", False, False), ("ListJobs", False, False),
        ("StopJob", False, False)]
    for method in service.methods:
        assert method.input_type.name == f"{method.name}Request"
        assert method.output_type.name == f"{method.name}Response"
    assert hasattr(admin_pb2_grpc, "AdminServiceStub")


def test_a_deploy_takes_the_servers_defaults_for_what_it_leaves_unset():
    default = Placement(device="cpu", dtype=torch.bfloat16)
    assert Placement().over(default) == default
    assert Placement(dtype=torch.float16).over(default) == Placement(device="cpu", dtype=torch.float16)
    assert Placement(device_map="auto").over(default) == Placement(dtype=torch.bfloat16, device_map="auto")
    assert Placement(device="auto").over(Placement(device_map="auto")) == Placement(device="auto")
