"""Profile a window of one rank's steps, where a benchmark or a user asks for it.

    TPSERVE_PROFILE=FIRST:COUNT:DIR   (e.g. 40:8:/tmp/prof)

makes every rank process run `torch.profiler` over its steps FIRST .. FIRST+COUNT-1 (counted from
the rank's first step, prefill included) and write two files into DIR: `rank{r}.txt`, the
operators and kernels by self time (CUDA, else CPU), and `rank{r}.trace.json`, the timeline for
Perfetto / chrome://tracing. The driver's TPSERVE_* settings reach every Ray rank, so one variable
set where `tpserve launch` or `bench/decode.py` runs profiles all ranks. Unset, nothing is imported
and a step costs one integer compare.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tpserve.errors import TpserveError

log = logging.getLogger(__name__)
ENV = "TPSERVE_PROFILE"


class StepProfiler:
    def __init__(self, rank: int, spec: str | None = None):
        spec = os.environ.get(ENV) if spec is None else spec
        self.rank, self.first, self.last, self.dir, self.prof = rank, -1, -1, None, None
        if not spec:
            return
        try:
            first, count, folder = spec.split(":", 2)
            self.first, self.last = int(first), int(first) + int(count) - 1
            if self.first < 0 or self.last < self.first or not folder:
                raise ValueError
        except ValueError:
            raise TpserveError(f"{ENV}={spec!r} is not FIRST:COUNT:DIR (e.g. 40:8:/tmp/prof, "
                               f"FIRST >= 0, COUNT >= 1)") from None
        self.dir = Path(folder)
        self.dir.mkdir(parents=True, exist_ok=True)

    def before(self, step: int) -> None:
        """Call before the rank's step number `step` (0-based). Never raises: a profiler that
        cannot start or write is logged and dropped, the rank keeps serving."""
        if step == self.first:
            self._guarded(self._start)

    def after(self, step: int) -> None:
        """Call after step `step`; writes the files after the window's last step."""
        if step == self.last and self.prof is not None:
            self._guarded(self._write)

    def _guarded(self, fn) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a diagnostic must not take the rank down
            log.error("rank %d: profiling failed (%s: %s); serving on without it", self.rank,
                      type(e).__name__, e)
            self.prof, self.first = None, -1

    def _start(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available()
                                         else [])
        self.prof = profile(activities=acts)
        self.prof.__enter__()

    def _write(self) -> None:
        import torch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        events = self.prof.key_averages()
        cuda = torch.cuda.is_available()
        table = events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                             row_limit=40)
        steps = self.last - self.first + 1
        (self.dir / f"rank{self.rank}.txt").write_text(
            f"rank {self.rank}, steps {self.first}..{self.last} ({steps} steps)\n{table}\n")
        self.prof.export_chrome_trace(str(self.dir / f"rank{self.rank}.trace.json"))
        log.info("rank %d: profile of steps %d..%d written to %s", self.rank, self.first,
                 self.last, self.dir)
        self.prof = None
