"""Worker arenas registered with CUDA as pinned host memory (the engine process, when it
serves a CUDA device).

A registered arena lets the CUDA path copy each request's input from its slot to the device,
and each answer from the device into its slot, with asynchronous DMA and no staging copy on
the host (``compute.py``, ``DeviceCompute._run_cuda_group``). Registration takes a while for
a large arena, so it runs in a thread when a worker says hello; requests that arrive before
it is done are staged as before. ``cudaHostRegisterPortable``: every device's context sees
the memory as pinned. The registration is undone before the arena is unmapped.
"""

from __future__ import annotations

import logging

import torch

from service.engine.ipc.arena import Arena

log = logging.getLogger("actserve.engine")
PORTABLE = 1  # cudaHostRegisterPortable


def pin(arena: Arena) -> bool:
    """Register ``arena``'s mapping with CUDA; False (and a log line) when it cannot be."""
    try:
        torch.cuda.check_error(
            torch.cuda.cudart().cudaHostRegister(arena.address, arena.size, PORTABLE))
    except Exception as exc:  # noqa: BLE001 - the arena is then staged as before
        log.warning("engine: cannot register arena %s as pinned memory (%s); its requests are "
                    "staged through a pinned buffer instead", arena.name, exc)
        return False
    return True


def unpin(arena: Arena) -> None:
    try:
        torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(arena.address))
    except Exception as exc:  # noqa: BLE001 - nothing more to do than say so
        log.warning("engine: cannot unregister arena %s (%s)", arena.name, exc)
