"""The shared gRPC service: server, streams, jobs, the report store, monitoring, transport, wire and client."""
