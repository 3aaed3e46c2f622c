"""The standard gRPC health service (``grpc.health.v1.Health``) of the coordinator.

Load balancers, Kubernetes gRPC probes and ``grpc_health_probe`` ask it whether to send
agents here. The answer, for the whole server (service ``""``) and for
``chainfed.v1.ChainFed`` alike:

* NOT_SERVING from the moment the port is bound while the state is loaded or resumed;
* SERVING once the chain is attached and answering;
* NOT_SERVING from the start of a shutdown (SIGTERM/SIGINT) until the port closes; a
  ``Watch`` stream sees the change before its call ends.

The health service takes no token: probes carry none, and it tells nothing about the
chain beyond up or down.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

CHAINFED_SERVICE = "chainfed.v1.ChainFed"
"""The service name probes may ask for (``""`` asks for the whole server)."""
_SERVICES = ("", CHAINFED_SERVICE)


class HealthReporter:
    """The health service added to one gRPC server; starts NOT_SERVING."""

    def __init__(self, server: grpc.Server) -> None:
        self._servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)
        self._set(health_pb2.HealthCheckResponse.NOT_SERVING)

    def _set(self, status: int) -> None:
        for service in _SERVICES:
            self._servicer.set(service, status)

    def serving(self) -> None:
        """The chain is attached: agents may be sent here."""
        self._set(health_pb2.HealthCheckResponse.SERVING)

    def shutting_down(self) -> None:
        """NOT_SERVING for good: later ``serving()`` calls change nothing."""
        self._servicer.enter_graceful_shutdown()
