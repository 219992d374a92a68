"""The benchmark sweep's cells: which server, which request, how many clients, how often.

A cell is one wrk run against one server with one request body. Groups:

* ``grid``: actserve over protocol x size x concurrency (relu: the cheapest activation, so
  the figures measure the serving path, not the kernel);
* ``reference``: the HTTP floor (same binary bodies) and the naive endpoint (same JSON);
* ``batching``: ``max_batch_requests=1`` beside the default;
* ``modes``: compute dtype, amp and in-place (silu, 65,536 elements);
* ``metrics``: the same server with ``--no-metrics``;
* ``shm`` and ``grpc``: Python clients, not wrk (``client_cells.py``), against
  ``actserve-grpc``;
* ``engine``: ``--engine process`` (the shared engine process, shared memory and a control
  socket) beside the inline default, native binary: 1,024 elements at 1 and 64 clients,
  1,048,576 at 8;
* ``workers``: ``--workers 1`` beside ``--workers 2`` (relu, native binary: 1,024 elements at
  64 clients and 1M elements at 8), two servers of their own measured in the same rounds;
* ``accesslog``: the same server with ``--no-access-log``.

Every actserve variant runs with the server's defaults (access log on, at ``info``) except
for the one setting its name says, so ``actserve`` is what a user running the defaults gets.

The cells that the performance bar divides are repeated (``repeats``) and run in rounds, so
the repeats of a pair are spread over the run rather than back to back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .payloads import Case

SIZES = (1024, 65536, 1048576)
CONCURRENCY = (1, 8, 64, 256)
PROTOCOLS = ("native-binary", "native-json", "v2-binary", "v2-json")
BIG_JSON = 1048576  # JSON bodies of this size run with at most 8 clients (see docs)
MODE_ACTIVATION = "silu"  # has an in-place variant, and costs enough to show dtype effects
MODE_SIZE = 65536
MODES = {
    "float32": {},
    "float16": {"compute_dtype": "float16"},
    "bfloat16": {"compute_dtype": "bfloat16"},
    "amp": {"amp": True},
    "inplace": {"inplace": True},
}

# server name -> ACTSERVE_* settings; DEFAULTS undo what loadtest.servers turns off
DEFAULTS = {"access_log": True, "log_level": "info"}
SERVERS = {
    "actserve": dict(DEFAULTS),
    "actserve-nometrics": {**DEFAULTS, "metrics": False},
    "actserve-batch1": {**DEFAULTS, "max_batch_requests": 1},
    "actserve-noaccesslog": {**DEFAULTS, "access_log": False},
    "actserve-engine": {**DEFAULTS, "engine": "process"},
    "actserve-grpc": {**DEFAULTS, "grpc_port": "free"},  # the shm and grpc groups
    "actserve-workers1": {**DEFAULTS, "workers": 1},
    "actserve-workers2": {**DEFAULTS, "workers": 2},
    "actserve-workers2-engine": {**DEFAULTS, "workers": 2, "engine": "process"},
}
CLIENT_GROUPS = ("shm", "grpc")  # driven by Python clients, not wrk
ENGINE_CELLS = ((1024, 1), (1024, 64), (1048576, 8))
WORKERS_CELLS = ((1024, 64), (1048576, 8))  # (size, clients) of the workers group
REFERENCES = ("floor", "naive", "echo")
ECHO_FROM = 65536  # the echo reference runs for sizes where the answer's size matters


@dataclass(frozen=True)
class Cell:
    group: str
    server: str  # a SERVERS key or a REFERENCES name
    case: Case
    concurrency: int
    mode: str = ""  # the MODES key for the modes group
    repeats: int = 1

    @property
    def key(self) -> str:
        c = self.case
        proto = {"floor": "floor-binary", "naive": "naive-json",
                 "echo": "echo-binary"}.get(self.server, c.protocol)
        server = "" if self.server in ("actserve", *REFERENCES) else f"[{self.server}] "
        mode = f" {self.mode}" if self.mode else ""
        act = f" {c.activation}" if self.group == "modes" else ""
        return f"{server}{proto}{act} {c.size} c{self.concurrency}{mode}"


@dataclass
class Plan:
    cells: list[Cell] = field(default_factory=list)

    def servers(self) -> list[str]:
        return sorted({c.server for c in self.cells})

    def rounds(self) -> list[list[Cell]]:
        most = max((c.repeats for c in self.cells), default=0)
        return [[c for c in self.cells if c.repeats > r] for r in range(most)]


def _json(protocol: str) -> bool:
    return protocol.endswith("json")


def bar_keys() -> set[tuple[str, str, int, int]]:
    """(server, protocol, size, concurrency) of the cells the performance bar divides."""
    return {
        ("floor", "native-binary", 1024, 64), ("actserve", "native-binary", 1024, 64),
        ("actserve", "v2-binary", 1024, 64), ("naive", "native-json", 1024, 64),
        ("actserve", "native-json", 1024, 64), ("floor", "native-binary", 1048576, 8),
        ("actserve", "native-binary", 1048576, 8), ("naive", "native-json", 1048576, 8),
        ("actserve", "native-json", 1048576, 8), ("floor", "native-binary", 1024, 1),
        ("actserve", "native-binary", 1024, 1), ("actserve-nometrics", "native-binary", 1024, 64),
        ("actserve-noaccesslog", "native-binary", 1024, 64),
        ("echo", "native-binary", 1048576, 8),
        *(("actserve-engine", "native-binary", size, conc) for size, conc in ENGINE_CELLS),
        *(("actserve", "native-binary", size, conc) for size, conc in ENGINE_CELLS),
        *((server, "native-binary", size, conc) for server in ("actserve-workers1",
          "actserve-workers2") for size, conc in WORKERS_CELLS),
        ("actserve-workers2-engine", "native-binary", 1024, 64),
    }


def full_plan(repeats: int, sizes=SIZES, concurrency=CONCURRENCY, protocols=PROTOCOLS,
              groups=("grid", "reference", "batching", "modes", "metrics", "accesslog", "engine",
                      "workers")) -> Plan:
    bars = bar_keys()

    def cell(group, server, case, conc, mode="") -> Cell:
        rep = repeats if (server, case.protocol, case.size, conc) in bars and not mode else 1
        return Cell(group, server, case, conc, mode, rep)

    def allowed(protocol: str, size: int, conc: int) -> bool:
        return not (_json(protocol) and size >= BIG_JSON and conc > 8)

    plan = Plan()
    for size in sizes:
        for conc in concurrency:
            if "reference" in groups:
                plan.cells.append(cell("reference", "floor", Case(size=size), conc))
                if size >= ECHO_FROM:
                    plan.cells.append(cell("reference", "echo", Case(size=size), conc))
                if allowed("native-json", size, conc):
                    plan.cells.append(cell("reference", "naive",
                                           Case(size=size, protocol="native-json"), conc))
            if "grid" in groups:
                for proto in protocols:
                    if allowed(proto, size, conc):
                        plan.cells.append(cell("grid", "actserve", Case(size=size, protocol=proto),
                                               conc))
    if "batching" in groups:
        for size in [s for s in sizes if s <= 65536]:
            for conc in concurrency:
                plan.cells.append(cell("batching", "actserve-batch1", Case(size=size), conc))
    if "metrics" in groups:
        for proto in ("native-binary", "native-json"):
            for conc in [c for c in concurrency if c in (1, 64)]:
                plan.cells.append(cell("metrics", "actserve-nometrics",
                                       Case(size=1024, protocol=proto), conc))
    if "engine" in groups:
        for size, conc in ENGINE_CELLS:
            plan.cells.append(cell("engine", "actserve-engine", Case(size=size), conc))
            inline = ("actserve", "native-binary", size, conc)
            if not any((c.server, c.case.protocol, c.case.size, c.concurrency) == inline
                       for c in plan.cells):
                plan.cells.append(cell("engine", "actserve", Case(size=size), conc))
    if "workers" in groups:
        for size, conc in WORKERS_CELLS:
            for server in ("actserve-workers1", "actserve-workers2"):
                plan.cells.append(cell("workers", server, Case(size=size), conc))
        plan.cells.append(cell("workers", "actserve-workers2-engine", Case(size=1024), 64))
    if "accesslog" in groups:
        for proto in ("native-binary", "native-json"):
            for conc in [c for c in concurrency if c in (1, 64)]:
                plan.cells.append(cell("accesslog", "actserve-noaccesslog",
                                       Case(size=1024, protocol=proto), conc))
    if "modes" in groups:
        for conc in [c for c in concurrency if c in (1, 64)]:
            for mode, settings in MODES.items():
                plan.cells.append(cell("modes", "actserve", Case(MODE_ACTIVATION, MODE_SIZE,
                                                                 **settings), conc, mode))
    return plan


def quick_plan() -> Plan:
    """About a dozen one-second cells: every protocol, both references, each server variant
    and two modes; enough to evaluate the 1,024-element bars."""
    c = Cell
    small = 1024
    cells = [
        c("reference", "floor", Case(size=small), 64), c("grid", "actserve", Case(size=small), 64),
        c("reference", "floor", Case(size=small), 1), c("grid", "actserve", Case(size=small), 1),
        c("grid", "actserve", Case(size=small, protocol="v2-binary"), 64),
        c("grid", "actserve", Case(size=small, protocol="native-json"), 64),
        c("grid", "actserve", Case(size=small, protocol="v2-json"), 8),
        c("reference", "naive", Case(size=small, protocol="native-json"), 64),
        c("grid", "actserve", Case(size=65536), 8), c("reference", "floor", Case(size=65536), 8),
        c("reference", "echo", Case(size=65536), 8),
        c("metrics", "actserve-nometrics", Case(size=small), 64),
        c("accesslog", "actserve-noaccesslog", Case(size=small), 64),
        c("batching", "actserve-batch1", Case(size=small), 64),
        c("modes", "actserve", Case(MODE_ACTIVATION, 4096, compute_dtype="bfloat16"), 8,
          "bfloat16"),
        c("modes", "actserve", Case(MODE_ACTIVATION, 4096, inplace=True), 8, "inplace"),
    ]
    return Plan(cells)
