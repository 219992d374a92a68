"""The transport-neutral request sequence (``sequence``), the byte budget every request
body or message is charged to (``budget``), the one bearer-token check (``auth``), the one
access-log line (``access``) and the services object the transports share (``services``).
HTTP (``service.http``) and gRPC (``service.grpc``) are thin adapters over it."""
