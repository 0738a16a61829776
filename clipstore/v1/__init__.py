"""Generated protobuf and gRPC code for clipstore.v1 (see proto/generate.py)."""
