"""KServe v2 / Open Inference Protocol over gRPC (grpcio's asyncio server), beside the HTTP
API, on the same engine, codec logic, recorder and shared-memory regions."""
