"""The autotuning every tuned kernel shares: Triton's autotuner with our own benchmark, its results
cached on disk (Triton's cache folder, so a second launch skips the benchmarks), and no tuning
under TRITON_INTERPRET=1, where callers pass fixed configs.

The benchmark times what a captured decode step sees: single calls whose weights come from DRAM.
Triton's `do_bench` records an event, launches from Python and records the end event, so a kernel
shorter than its own launch (~20-40 us of host work; every decode GEMV) is timed as the launch,
and configs are ranked by noise. Here the calls are enqueued behind a GPU sleep that outlasts the
host's enqueueing (checked, and lengthened when it does not), so the events bracket the kernel
alone, and before each call a read of twice the L2's size evicts the previous call's lines (a
read leaves clean lines, as the other weights of a decode step do; a zeroing flush would add
write-backs to the timed call).
"""

from __future__ import annotations

import logging
import os
import statistics

import triton

log = logging.getLogger(__name__)
_PICKS: dict = {}  # key -> the name of the faster kernel (`faster`)

CALLS = 24  # timed calls per config


def _flush_buffer(torch):
    """Twice the L2 in bytes (allocated per benchmark: the allocator keeps it for reuse, and
    nothing holds it once tuning is over)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    l2 = getattr(props, "L2_cache_size", 0) or 50 << 20
    return torch.ones(2 * l2 // 4, dtype=torch.int32, device="cuda")


SLEEP_CYCLES = 2_000_000  # ~1 ms of GPU time while the host enqueues a config's calls
_LONGEST = SLEEP_CYCLES << 10  # ~1 s: past this the host is not merely slow


def _bench(fn, quantiles=None):
    """Device time of one call in ms (the given quantiles of CALLS calls, else their median).

    If the sleep ends before the host has enqueued every call (a slow host, or a call with much
    host work, such as a whole dispatch in `faster`), the later calls would be timed from their
    launch: the run is repeated with a sleep four times longer, up to ~1 s (then the times are
    taken as they are, with a warning)."""
    import torch
    flush = _flush_buffer(torch)
    fn()  # compile, and any first-call work
    torch.cuda.synchronize()
    sleep = SLEEP_CYCLES
    while True:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(CALLS)]
        awake = torch.cuda.Event()
        torch.cuda._sleep(sleep)
        awake.record()
        for a, b in events:
            flush.amax()
            a.record()
            fn()
            b.record()
        late = awake.query()  # the GPU woke before the last call was enqueued
        torch.cuda.synchronize()
        if not late:
            break
        if sleep >= _LONGEST:
            log.warning("tuning: the host enqueued %d calls more slowly than a %d-cycle GPU sleep; "
                        "these timings include launch time", CALLS, sleep)
            break
        sleep *= 4
    times = sorted(a.elapsed_time(b) for a, b in events)
    if quantiles is None:
        return statistics.median(times)
    return [times[min(len(times) - 1, int(q * len(times)))] for q in quantiles]


def faster(key, candidates: dict) -> str:
    """The name of the fastest of `candidates` (name -> a call), timed once per key with the
    benchmark above; each candidate's own autotuning runs in its first call, before it is timed.
    For choosing between two kernels for the same product (`dispatch.gptq_matmul_triton`)."""
    if key not in _PICKS:
        times = {name: _bench(fn) for name, fn in candidates.items()}
        _PICKS[key] = min(times, key=times.get)
        log.info("kernel for %s: %s (%s)", key, _PICKS[key],
                 ", ".join(f"{n} {t * 1e3:.1f} us" for n, t in times.items()))
    return _PICKS[key]


def autotuned(kernel, configs, key, prune=None, reset_to_zero=None):
    """The autotuned kernel, or None under the interpreter. `prune`: an early_config_prune;
    `reset_to_zero`: arguments zeroed before each timed call and before the tuned call (outputs
    that a kernel adds into)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    by = None if prune is None else {"early_config_prune": prune}
    try:
        return triton.autotune(configs, key=key, prune_configs_by=by, do_bench=_bench,
                               cache_results=True, reset_to_zero=reset_to_zero)(kernel)
    except TypeError:  # an older triton without do_bench= / cache_results=
        return triton.autotune(configs, key=key, prune_configs_by=by,
                               reset_to_zero=reset_to_zero)(kernel)
