"""Several processes behind one port: a supervisor (``supervisor.py``) starts and restarts
N HTTP workers (``worker.py``), each today's app with its own compute thread; the workers
share readiness through flags in shared memory (``rundir.py``) and their numbers through
per-worker Unix sockets (``peers.py``, ``cluster.py``, ``merge.py``). Torch-free except the
worker, which builds the app."""
