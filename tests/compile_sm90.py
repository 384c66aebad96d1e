"""A step's Triton kernels compiled for an H100/H200 (sm_90) on a machine without a GPU.

CI has no GPU and runs the kernels under TRITON_INTERPRET=1, which executes their Python and
never compiles them; a kernel that the GPU compiler refuses (an op the interpreter accepts, a
type error in a branch the interpreter never took) would otherwise show up only on the device.
Two processes, since the interpreter is chosen when the kernels are imported:

  record   run kernel tests under the interpreter, noting every launch (kernel, argument types,
           constexpr values, num_warps) into a JSON file
  compile  read that file, compile each distinct launch for sm_90 with PDL on where the kernel
           has it (as on an H100), and print per launch what its PTX holds (JSON on stdout)

    python tests/compile_sm90.py record /tmp/launches.json
    python tests/compile_sm90.py compile /tmp/launches.json [fixed-readers]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

TESTS = Path(__file__).parent
# What runs a step: the GEMV (written and fixed-point outputs, fp16x2 and fp32 paths), the
# few-row and prefill GEMMs, the norms, SiLU-mul, rotary + KV write (fixed-point inputs too),
# decode attention, the head; and the one-shot all-reduces (`_one_shot_calls`).
SELECTION = [str(TESTS / f) for f in (
    "test_fixed_sum.py",
    "test_fused_kernels.py::test_rotary_store_writes_each_rows_cache_entry_and_nothing_else",
    "test_attention_kernels.py::test_decode_kernel_matches_reference",
    "test_kernels.py::test_head_matmul_matches_reference",
    "test_kernels.py::test_gptq_triton_matches_reference",
    "test_kernels.py::test_fp16x2_rows_kernel_matches_reference")]
# Launches compiled per kernel: distinct in argument types and in the constexprs that choose
# code (block sizes aside), at most this many (each takes a second or more on 2 cores)
PER_KERNEL = 10
SIZES = ("BLOCK", "SPLIT_K", "GROUP_M", "NUM_SPLITS")
# the input through which each reader takes a fixed-point sum (kernels/fixed_sum.py)
FIXED_INPUTS = {"_rms_norm_kernel": "r_ptr", "_silu_mul_kernel": "g_ptr",
                "_rotary_store_kernel": "q_ptr", "_one_shot_norm_kernel": "x_ptr"}
_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "int64": "i64",
          "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


def _type(value) -> str | None:
    """The signature type of a runtime argument (None: it is passed as a constexpr)."""
    import torch
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[str(value.dtype).removeprefix("torch.")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    return None


def _one_shot_calls() -> None:
    """The one-shot all-reduces (plain and fused with the add + norm) of a group of one rank, in
    this process (their tests run each rank in a process of its own); compiled for two ranks."""
    import torch

    from tpserve.kernels.allreduce import MAX_BLOCKS, one_shot_add_rms_norm, one_shot_all_reduce
    for dtype in (torch.float16, torch.float32):
        x, h = torch.randn(2, 64, dtype=dtype), torch.randn(2, 64, dtype=dtype)
        buf, flags = torch.zeros(2 * 128, dtype=dtype), torch.zeros(MAX_BLOCKS, dtype=torch.int64)
        bufs, flag_ptrs = (torch.tensor([t.data_ptr()]) for t in (buf, flags))
        counters = torch.zeros(MAX_BLOCKS, dtype=torch.int64)
        one_shot_all_reduce(x.view(-1), torch.empty(128, dtype=dtype), bufs, flag_ptrs, counters,
                            128, 0, 1)
        one_shot_add_rms_norm(x, h, torch.ones(64, dtype=dtype), 1e-5, None, bufs, flag_ptrs,
                              counters, 128, 0, 1)
        fixed = (x.double() * 2.0 ** 32).long()  # a row-parallel GEMV's fixed-point sum
        one_shot_add_rms_norm(fixed, h, torch.ones(64, dtype=dtype), 1e-5, None, bufs, flag_ptrs,
                              counters, 128, 0, 1)


def record(path: str) -> int:
    os.environ["TRITON_INTERPRET"] = "1"
    import pytest
    from triton.runtime.interpreter import InterpretedFunction
    launches, run = {}, InterpretedFunction.run

    def noted(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        bound = dict(zip(self.arg_names, args)) | kwargs
        options = {k: bound.pop(k) for k in ("num_warps", "num_stages") if k in bound}
        notes = {n: str(a) for n, a in getattr(fn, "__annotations__", {}).items()}
        sig, consts = {}, {}
        for name in self.arg_names:
            value = bound.get(name)
            kind = None if "constexpr" in notes.get(name, "") else _type(value)
            if kind is None:
                consts[name] = value
            sig[name] = kind or "constexpr"
        key = json.dumps([fn.__module__, fn.__qualname__, sig, consts, options], sort_keys=True,
                         default=str)
        launches.setdefault(key, None)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = noted
    code = pytest.main(["-q", "-p", "no:cacheprovider", *SELECTION])
    if code != 0:
        print(f"the recorded tests failed (exit {code})", file=sys.stderr)
        return 1
    _one_shot_calls()
    Path(path).write_text(json.dumps([json.loads(k) for k in launches]))
    return 0


def _barrier_between(ptx: str) -> bool:
    """Whether the first 64-bit store comes after a bar.sync that follows a 64-bit load (the
    fixed-point readers' barrier take)."""
    lines = ptx.splitlines()

    def first(words: tuple[str, ...], start: int = 0) -> int | None:
        return next((i for i in range(start, len(lines)) if all(w in lines[i] for w in words)),
                    None)
    load, store = first(("ld.global", "b64")), first(("st.global", "b64"))
    bar = None if load is None else first(("bar.sync",), load)
    return None not in (load, bar, store) and load < bar < store


def _waits_first(ptx: str) -> bool:
    """Whether griddepcontrol.wait comes before every global load, store and atomic (a kernel
    launched with PDL that reads nothing another kernel writes before it waits)."""
    ops = [ln.strip() for ln in ptx.splitlines()]
    wait = next((i for i, o in enumerate(ops) if o.startswith("griddepcontrol.wait")), None)
    return wait is not None and not any(
        ("ld.global" in o or "st.global" in o or "atom." in o or "red." in o)
        and not o.startswith("//") for o in ops[:wait])


def compile_all(path: str, only: str | None = None) -> int:
    """`only`: "fixed-readers", the launches that take fixed-point sums (int64 inputs)."""
    os.environ["TRITON_INTERPRET"] = "0"
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    seen: dict[str, int] = {}
    out = []
    for module, name, sig, consts, options in json.loads(Path(path).read_text()):
        kind = name + json.dumps([sig, {k: v for k, v in consts.items()
                                        if not k.startswith(SIZES)}], sort_keys=True)
        if seen.setdefault(name, 0) >= PER_KERNEL or kind in seen:
            continue
        seen[name] += 1
        seen[kind] = 1
        if only == "fixed-readers" and sig.get(FIXED_INPUTS.get(name)) != "*i64":
            continue
        kernel = getattr(importlib.import_module(module), name)
        if "PDL" in consts:
            consts["PDL"] = True  # as launched on sm_90 (pdl.py)
        if consts.get("WORLD") == 1:
            consts["WORLD"] = 2  # a one-rank group in the recording; two GPUs here
        try:
            compiled = triton.compile(ASTSource(kernel, sig, constexprs=consts),
                                      target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": options.get("num_warps", 4)})
            ptx, error = compiled.asm["ptx"], None
        except Exception as e:  # reported per launch
            ptx, error = "", f"{type(e).__name__}: {str(e)[:400]}"
        out.append({"kernel": name, "sig": sig, "consts": consts, "error": error,
                    "ptx": {w: w in ptx for w in ("griddepcontrol.wait",
                                                  "griddepcontrol.launch_dependents",
                                                  "red.global", "add.u64", "atom.global",
                                                  "exch.b64", "st.global")}
                    | {"barrier between": _barrier_between(ptx), "waits first": _waits_first(ptx)}})
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    mode, path, *only = sys.argv[1:]
    sys.exit(record(path) if mode == "record" else compile_all(path, *only))
