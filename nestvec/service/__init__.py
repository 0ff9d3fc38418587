"""gRPC service over collections (see protos/); built in its own issue."""
