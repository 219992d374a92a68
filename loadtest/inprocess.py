"""In-process measurements, no HTTP: raw torch versus our batcher + executor path (the
overhead of our own machinery), memory copy bandwidth (the physical limit on this host),
and the compute time and memory that dtype / amp / in-place cost per request.

Torch work here runs with the server's default intra-op thread count (1).
"""

from __future__ import annotations

import asyncio
import time

import numpy as np


def _best_rate(fn, elements: int, seconds: float, min_iters: int = 3) -> float:
    """Elements per second: total elements over total time of repeated calls (after one
    warm-up call), run for about ``seconds``."""
    fn()
    n, t0 = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n * elements / (time.perf_counter() - t0)


def copy_bandwidth(seconds: float, nbytes: int = 64 << 20) -> dict:
    """Main-memory copy bandwidth (bytes copied per second; a copy reads and writes each)."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    rate = _best_rate(lambda: np.copyto(dst, src), src.size, seconds)
    return {"bytes": nbytes, "copy_GBps": rate * 4 / 1e9, "float32_elements_per_s": rate}


def raw_torch(activation: str, size: int, seconds: float, held: bool = False) -> float:
    """Elements/s of the registry's activation called straight on a float32 tensor.

    A tight loop drops each output before the next call, so the allocator hands the same,
    cache-hot buffer back every time. With ``held`` each output lives until the next one
    exists (as a server's answer does until it is sent), so outputs alternate between two
    buffers: the cost of fresh output memory, still without any serving machinery."""
    import torch

    from service.engine.activations import Registry

    torch.set_num_threads(1)
    act = Registry().get(activation)
    x = torch.from_numpy(np.random.default_rng(size).standard_normal(size).astype(np.float32))
    params = act.parse_params({})
    last: list = [None]

    def call_held() -> None:
        last[0] = act.apply(x, False, params)  # the previous output is freed only now

    with torch.inference_mode():
        if held:
            return _best_rate(call_held, size, seconds)
        return _best_rate(lambda: act.apply(x, False, params), size, seconds)


def executor_path(activation: str, loads: list[tuple[int, int]], seconds: float,
                  device: str = "cpu") -> list[dict]:
    """Elements/s through ``Engine.submit`` (job build, batcher, compute thread, result back
    on the loop), for each ``(size, concurrency)`` in ``loads``: ``concurrency`` jobs of
    ``size`` elements kept in flight. One engine on ``device`` serves every load."""
    from service.engine.engine import Engine
    from service.settings import Settings

    async def measure(rt, act, size: int, concurrency: int) -> dict:
        x = np.random.default_rng(size).standard_normal(size).astype(np.float32)
        done = 0
        batches: list[int] = []

        async def one() -> None:
            nonlocal done
            res = await rt.submit(rt.jobs.build(act, x, "float32", {}, {}, api="bench"))
            batches.append(res.batch_elements)
            done += size

        async def worker(stop: float) -> None:
            while time.perf_counter() < stop:
                await one()

        await asyncio.gather(*[one() for _ in range(concurrency)])  # warm-up
        done, batches[:] = 0, []
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(t0 + seconds) for _ in range(concurrency)])
        elapsed = time.perf_counter() - t0
        return {"size": size, "concurrency": concurrency, "elements_per_s": done / elapsed,
                "mean_batch_elements": float(np.mean(batches)) if batches else 0.0}

    async def main() -> list[dict]:
        rt = Engine(Settings(metrics=False, access_log=False, device=device))
        await rt.start()
        try:
            act = rt.registry.get(activation)
            return [await measure(rt, act, size, conc) for size, conc in loads]
        finally:
            await rt.stop()

    return asyncio.run(main())


def mode_costs(activation: str, size: int, modes: dict[str, dict], seconds: float) -> dict:
    """Per mode: compute time of one ``size``-element request on the compute path, and the
    bytes torch allocated for it (the profiler's CPU memory events)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from service.engine.activations import Registry
    from service.engine.compute import DeviceCompute
    from service.engine.job import JobResult, Mode
    from service.engine.reference import lone_job

    torch.set_num_threads(1)
    reg = Registry()
    dc = DeviceCompute(torch.device("cpu"))
    x = np.random.default_rng(size).standard_normal(size).astype(np.float32)
    out = {}
    for label, m in modes.items():
        act = reg.get(activation)
        mode = Mode(m.get("compute_dtype"), bool(m.get("amp")), None, bool(m.get("inplace")))
        job = lone_job(act, act.parse_params({}), x.copy(), "float32", mode)
        with torch.inference_mode():
            first = dc.run([job])[0]
            if not isinstance(first, JobResult):
                out[label] = {"error": str(first)}
                continue
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                dc.run([job])
            allocated = sum(e.self_cpu_memory_usage for e in prof.key_averages()
                            if e.self_cpu_memory_usage > 0)
            rate = _best_rate(lambda job=job: dc.run([job]), size, seconds)
        out[label] = {"ms_per_request": size / rate * 1e3, "allocated_bytes": int(allocated),
                      "out_dtype": first.dtype}
    return out
