"""Generated gRPC stubs for protos/embedrpc/v1 (regenerate: python scripts/gen_protos.py)."""
