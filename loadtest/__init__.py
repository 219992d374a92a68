"""Load tests (Locust) and the benchmark sweep (wrk + in-process measurements).

``python -m loadtest.bench --help`` (also ``actserve bench``) runs the sweep;
``python -m loadtest.run_locust --help`` (``make loadtest``) runs a headless Locust test.
"""
