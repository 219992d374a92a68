"""Each worker's cumulative numbers on disk, so that a killed worker's counts survive it.

A worker writes its summable snapshot (metric families and v2 statistics) to
``snap/w<slot>.pickle`` every ``PERIOD_S`` (write, then an atomic rename). When a worker
dies, the supervisor renames that file to ``snap/r-<slot>-<n>.pickle`` (atomic too): from
then on the file is part of every merge as a retired worker. A scrape takes one listing of
the folder, so a file that moves while it reads makes it list again: each snapshot is
counted exactly once. What a killed worker counted after its last snapshot (at most
``PERIOD_S``) is lost.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

PERIOD_S = 1.0
_LIVE = re.compile(r"^w(\d+)\.pickle$")
_RETIRED = re.compile(r"^r-\d+-\d+\.pickle$")


class SnapshotFiles:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def write(self, slot: int, snapshot: dict) -> None:
        tmp = self.folder / f".w{slot}.tmp"
        tmp.write_bytes(pickle.dumps(snapshot, protocol=pickle.HIGHEST_PROTOCOL))
        os.replace(tmp, self.folder / f"w{slot}.pickle")

    def retire(self, slot: int, generation: int) -> bool:
        """The dead worker ``slot``'s last snapshot joins the retired ones (supervisor)."""
        try:
            os.rename(self.folder / f"w{slot}.pickle",
                      self.folder / f"r-{slot}-{generation}.pickle")
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
                    data = pickle.loads((self.folder / name).read_bytes())
                    if m is not None:
                        live[int(m.group(1))] = data
                    else:
                        retired.append(data)
            except FileNotFoundError:  # renamed while we read: list again
                continue
            return live, retired
        return {}, []
