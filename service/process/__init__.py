"""Several processes behind one port: a supervisor (``supervisor.py``) starts and restarts
N HTTP workers (``worker.py``), each today's app with its own compute thread; the workers
share readiness through flags in shared memory (``rundir.py``) and their numbers through
per-worker Unix sockets (``peers.py``, ``cluster.py``, ``merge.py``), and custom
activations through files in the run directory (``shared_registrations.py``). Torch-free
except the worker, which builds the app, and what only it loads (``cluster.py``)."""
