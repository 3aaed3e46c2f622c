"""gRPC coordinator: chain state machine, aggregation, persistence, auth."""
