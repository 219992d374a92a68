"""The overload bench's steps as a Locust shape, for those who drive actserve with Locust.

    python -m locust -f loadtest/locust_overload.py --headless --host http://127.0.0.1:8000 \\
        --overload-capacity 300 --overload-elements 262144 --overload-step-s 10 \\
        --csv overload

Each user sends one request a second (``constant_throughput(1)``) and gives up on it at
its deadline (``--overload-deadline-s``, 1 s, also the request's ``timeout``), so no user
waits past its next turn: the offered rate is the number of users whatever the answers,
the open loop of ``loadtest/overload.py`` (a closed loop, each user waiting for its answer,
would slow down with the server and hide the overload). ``OverloadShape`` holds
``capacity x multiple`` users for ``--overload-step-s`` seconds at each of
``--overload-steps`` (0.5, 1, 2, 5, 10) and then stops. A 200 within the deadline is a
success; anything else is a failure named for what it was (a refusal by its error type,
``front_limit``, ``predicted_late``, ...; ``late`` for an answer or a give-up past the
deadline), so Locust's failures table is the refusals by reason and its request statistics
the goodput. Every request carries its start as ``X-Request-Start``, which a server run
with ``trust_request_start`` counts the deadline from. Give the capacity as measured
(``python -m loadtest.overload`` prints it, or a closed-loop run). It fits where 10x the
capacity is within what the Locust workers can send (one core sends about 1,000-2,000
requests a second: large requests on a CPU, or add ``--processes``/workers); beyond that,
the overload bench's own generator.
"""

from __future__ import annotations

import time

import numpy as np
from locust import FastHttpUser, LoadTestShape, constant_throughput, events, task

from loadtest.overload_shape import refusal, users_at

STEPS = "0.5,1,2,5,10"


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    add = parser.add_argument
    add("--overload-capacity", type=float, default=100.0, include_in_web_ui=True,
        help="the server's capacity for this request, requests a second")
    add("--overload-steps", default=STEPS, include_in_web_ui=True,
        help="multiples of the capacity offered, in order")
    add("--overload-step-s", type=float, default=10.0, include_in_web_ui=True,
        help="seconds each step lasts")
    add("--overload-elements", type=int, default=1024, include_in_web_ui=True,
        help="float32 elements a request")
    add("--overload-activation", default="gelu", include_in_web_ui=True)
    add("--overload-deadline-s", type=float, default=1.0, include_in_web_ui=True,
        help="each request's timeout, and when its user gives up on it")


@events.init.add_listener
def _deadline(environment, **_) -> None:
    opts = environment.parsed_options
    if opts is not None:  # the user's connection gives up at the deadline
        OverloadUser.network_timeout = opts.overload_deadline_s
        OverloadUser.connection_timeout = opts.overload_deadline_s


class OverloadShape(LoadTestShape):
    """``capacity x multiple`` users at each step, all started at once."""

    def tick(self) -> tuple[int, float] | None:
        opts = self.runner.environment.parsed_options
        steps = [float(s) for s in opts.overload_steps.split(",")]
        users = users_at(self.get_run_time(), opts.overload_capacity, steps,
                         opts.overload_step_s)
        return None if users is None else (users, float(users))


class OverloadUser(FastHttpUser):
    wait_time = constant_throughput(1.0)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        n, self.deadline = opts.overload_elements, opts.overload_deadline_s
        self.body = np.random.default_rng(7).standard_normal(n).astype("<f4").tobytes()
        self.path = (f"/v1/activations/{opts.overload_activation}?shape={n}&dtype=float32"
                     f"&timeout={self.deadline:g}")
        self.label = f"{opts.overload_activation} {n}"

    @task
    def activate(self) -> None:
        t0 = time.perf_counter()
        headers = {"Content-Type": "application/octet-stream",
                   # its start, for a server run with trust_request_start (the same host
                   # or NTP): the deadline then counts from here, as the user's does
                   "X-Request-Start": f"t={int(time.time() * 1e6)}"}
        with self.client.post(self.path, data=self.body, name=self.label, catch_response=True,
                              headers=headers) as resp:
            late = time.perf_counter() - t0 > self.deadline
            if resp.status_code == 200 and not late:
                resp.success()
            elif resp.status_code in (0, 200) or late:
                resp.failure("late")  # given up at the deadline, or answered after it
            else:
                resp.failure(refusal(resp.status_code, resp.content))

