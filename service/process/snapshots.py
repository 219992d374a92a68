"""Each worker's cumulative numbers on disk, so that a killed worker's counts survive it.

A worker writes its summable snapshot (metric families and v2 statistics) to
``snap/w<slot>.snap`` every ``PERIOD_S`` (write, then an atomic rename). When a worker
dies, the supervisor renames that file to ``snap/r-<slot>-<n>.snap`` (atomic too): from
then on the file is part of every merge as a retired worker. A scrape takes one listing of
the folder, so a file that moves while it reads makes it list again: each snapshot is
counted exactly once. What a killed worker counted after its last snapshot (at most
``PERIOD_S``) is lost.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from service.process import wire

PERIOD_S = 1.0
_LIVE = re.compile(r"^w(\d+)\.snap$")
_RETIRED = re.compile(r"^r-\d+-\d+\.snap$")


class SnapshotFiles:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def write(self, slot: int, snapshot: dict) -> None:
        tmp = self.folder / f".w{slot}.tmp"
        tmp.write_bytes(wire.dumps(snapshot))
        os.replace(tmp, self.folder / f"w{slot}.snap")

    def retire(self, slot: int, generation: int) -> bool:
        """The dead worker ``slot``'s last snapshot joins the retired ones (supervisor)."""
        try:
            os.rename(self.folder / f"w{slot}.snap", self.folder / f"r-{slot}-{generation}.snap")
        except FileNotFoundError:  # it died before its first snapshot
            return False
        return True

    def read(self) -> tuple[dict[int, dict], list[dict]]:
        """(the live workers' last snapshots by slot, the retired snapshots)."""
        for _ in range(5):
            live: dict[int, dict] = {}
            retired: list[dict] = []
            try:
                for name in sorted(os.listdir(self.folder)):
                    m = _LIVE.match(name)
                    if m is None and not _RETIRED.match(name):
                        continue
                    data = wire.loads((self.folder / name).read_bytes())
                    if m is not None:
                        live[int(m.group(1))] = data
                    else:
                        retired.append(data)
            except FileNotFoundError:  # renamed while we read: list again
                continue
            except (ValueError, OSError):  # unreadable: count nothing rather than fail a scrape
                return {}, []
            return live, retired
        return {}, []
