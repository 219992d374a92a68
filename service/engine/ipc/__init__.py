"""The shared engine: one engine process per server owns the devices and batches every
worker's requests; workers reach it through ``RemoteEngine``. Tensors travel through
shared memory (``arena``), control messages over a Unix socket (``channel``)."""
