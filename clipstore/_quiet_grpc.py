"""Imported by the command line before anything imports grpc: gRPC's C core reads GRPC_VERBOSITY once, at
`import grpc`, and otherwise writes plain-text lines of its own to stderr, where only JSON lines belong.
Set GRPC_VERBOSITY (e.g. to debug) to see them while diagnosing."""

import os

os.environ.setdefault("GRPC_VERBOSITY", "NONE")
