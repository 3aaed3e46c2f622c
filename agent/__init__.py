"""On-device runtime: model streaming, prefix cache, chain trainer, gRPC client."""
