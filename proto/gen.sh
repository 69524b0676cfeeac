#!/usr/bin/env bash
# Regenerates the Python code for proto/tether/v1/*.proto beside the .proto
# files (imported as tether.v1.jobs_pb2 etc.). The output is committed;
# tests/unit/test_proto.py fails when it differs from a fresh run.
# Usage: [PYTHON=python3] proto/gen.sh [OUT_DIR]   (default: proto)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-proto}"
mkdir -p "$out"
"${PYTHON:-python}" -m grpc_tools.protoc -Iproto \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    proto/tether/v1/*.proto
