"""The jobs a worker has handed to the engine process (or holds until its arena has room):
the pending-jobs table of ``RemoteEngine``, by channel id and by job. An entry stays until
the engine is done with the job's slots (``RemoteEngine._forget``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from service.engine.job import Job


@dataclass(slots=True, eq=False)
class Pending:
    job: Job
    future: asyncio.Future
    in_bytes: int  # arena bytes of the input (and the upstream gradient after it)
    out_bytes: int  # arena bytes of the answer (and the gradient at its end)
    in_off: int = -1  # -1: no slot yet
    out_off: int = -1
    sent: bool = False  # the engine has the job
    lent: tuple[int, int] | None = None  # the input's slot when the body was read into it


class PendingJobs:
    def __init__(self) -> None:
        self._by_id: dict[int, Pending] = {}
        self._by_job: dict[Job, int] = {}
        self._idle = asyncio.Event()

    def __len__(self) -> int:
        return len(self._by_id)

    def add(self, jid: int, p: Pending) -> None:
        self._by_id[jid] = p
        self._by_job[p.job] = jid

    def get(self, jid: int) -> Pending | None:
        return self._by_id.get(jid)

    def id_of(self, job: Job) -> int | None:
        return self._by_job.get(job)

    def ids(self) -> list[int]:
        return list(self._by_id)

    def pop(self, jid: int) -> Pending | None:
        p = self._by_id.pop(jid, None)
        if p is not None:
            self._by_job.pop(p.job, None)
            if not self._by_id:
                self._idle.set()
        return p

    async def empty(self) -> None:
        """Returns once no job is pending."""
        while self._by_id:
            self._idle.clear()
            await self._idle.wait()
