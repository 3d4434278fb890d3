#!/usr/bin/env bash
# Regenerate the Python messages of the V2 gRPC protocol from app/integrations/scoring/v2_grpc/inference.proto.
# Needs grpcio-tools (a development dependency); the generated files are committed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
.venv/bin/python -m grpc_tools.protoc -I app/integrations/scoring/v2_grpc \
    --python_out=app/integrations/scoring/v2_grpc --pyi_out=app/integrations/scoring/v2_grpc app/integrations/scoring/v2_grpc/inference.proto
echo "generated app/integrations/scoring/v2_grpc/inference_pb2.py and inference_pb2.pyi"
