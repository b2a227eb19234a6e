"""Generated modules (validate_pb2) from protos/buf/validate/validate.proto; see scripts/gen_protos.py."""
