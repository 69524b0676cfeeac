"""The tether.v1 wire contract: protobuf and gRPC modules generated from proto/tether/v1/*.proto.

Regenerate with proto/gen.sh (or `make proto`); never edit the *_pb2* files by hand.
"""

__all__ = [
    "failure_pb2",
    "jobs_pb2",
    "jobs_pb2_grpc",
    "models_pb2",
    "models_pb2_grpc",
    "program_pb2",
    "values_pb2",
]
