"""Programmatic dependent launch (PDL; Hopper and later) for the decode step's kernels.

A decode step is ~300 short kernels, and without PDL each starts only once the kernel before it
has finished and its writes are flushed: the GEMV's first weight loads (~1 us from DRAM) wait
behind a norm, an attention or an all-reduce that is itself waiting for a peer GPU. A GPTQ GEMV
is launched with PDL (`options`) and runs in two parts:

  1. as soon as every program of the kernel before it has started: load the first tile of
     weights, which no kernel writes;
  2. `wait`: block until the kernel before it has completed and its writes are visible, then
     read x, use the split-K workspace, write the output.

The step's other kernels (RMSNorm, residual add + RMSNorm, rotary + KV write, decode attention,
SiLU-mul, the quantized head) are launched with PDL too (`step_options`) and `wait` first thing:
they read nothing before it, but their programs are resident and past their launch when the
kernel before them ends. (The one-shot all-reduces `wait` too, but are launched as usual until
that is run across GPUs.) Every one of these kernels
calls `release` first thing, which lets the kernel after it start early; for a kernel launched
without PDL `release` and `wait` do nothing. Captured CUDA graphs keep these edges.

The rule for a kernel launched with PDL: before `wait` it reads only weights (nothing a kernel
of the step writes) and writes nothing. After `wait` everything before it has completed: a
kernel completes only after its own `wait` returned, so completion follows the stream's order.

Off (`options` gives PDL=False, and the kernels compile without the instructions) under
TRITON_INTERPRET=1, before sm90, on a Triton without griddepcontrol, and with TPSERVE_PDL=0
(for A/B timing: `bench/gpu_quick.sh` runs both); TPSERVE_PDL=gemv launches only the GEMVs with
PDL (the A/B of `step_options`).
"""

from __future__ import annotations

import functools
import os

import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without grid dependency control
    gdc_launch_dependents = gdc_wait = None

ENV = "TPSERVE_PDL"


@functools.cache
def enabled(device_index: int | None) -> bool:
    """Whether kernels on this CUDA device use PDL (see the module docstring)."""
    if (os.environ.get("TRITON_INTERPRET", "0") == "1" or gdc_wait is None
            or os.environ.get(ENV, "1") == "0"):
        return False
    import torch
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def options(x) -> dict:
    """Launch arguments for a kernel with a `PDL` constexpr that is launched with PDL (the launch
    option only where on: a Triton without PDL does not know it)."""
    on = x.is_cuda and enabled(x.device.index)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


def step_options(x) -> dict:
    """Launch arguments for the step's other kernels that `wait` (norms, rotary + KV write, decode
    attention, SiLU-mul, the head): launched with PDL as the GEMVs are,
    so that each is resident when the kernel before it ends; TPSERVE_PDL=gemv launches only the
    GEMVs so (the A/B)."""
    if os.environ.get(ENV, "1") == "gemv":
        return {"PDL": flag(x)}  # release only; `wait` is then a no-op
    return options(x)


def flag(x) -> bool:
    """The `PDL` constexpr for a kernel that only `release`s (launched as usual)."""
    return x.is_cuda and enabled(x.device.index)


@triton.jit
def wait(PDL: tl.constexpr):
    """Block until the kernel before this one has completed and its writes are visible."""
    if PDL:
        gdc_wait()


@triton.jit
def release(PDL: tl.constexpr):
    """Let the kernel after this one start (its programs load weights, then `wait`)."""
    if PDL:
        gdc_launch_dependents()
