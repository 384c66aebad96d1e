"""Programmatic dependent launch (kernels/pdl.py): the GEMVs that start before the kernel ahead
of them has finished read only weights until they wait, and write nothing.

No GPU here, so the kernels are compiled for sm90 (Triton's own compiler, no device needed) in a
subprocess without the interpreter, and their PTX is read: where `griddepcontrol.wait` falls
among the loads and stores. What PDL buys is measured on a GPU (`bench/gpu_quick.sh`, A/B with
TPSERVE_PDL=0), and its tokens are checked there (graph vs eager, `tpserve verify`).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from tpserve.kernels import pdl

# Compiles each GEMV kernel for sm90 with PDL on and off; prints per kernel the PTX memory
# instructions before and after the wait.
_COMPILE = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tpserve.kernels import gptq_decode, gptq_gemv, gptq_h2mm

PTRS = dict(x_ptr="*fp16", perm_ptr="*i32", qw_ptr="*i32", qz_ptr="*i32", s_ptr="*fp16",
            gidx_ptr="*i32", out_ptr="*fp16", ws_ptr="*fp32", cnt_ptr="*i32", clr_ptr="*i64")
COMMON = dict(BITS=4, GROUP_SIZE=128, GROUP_OFFSET=0, HAS_GIDX=False, HAS_PERM=False, MODE=0,
              EVEN_K=True, BLOCK_N=64, BLOCK_K=256, SPLIT_K=4)
KERNELS = {"gemv": (gptq_gemv._gemv_kernel, dict(H2=True, CLEAR=False)),
           "decode": (gptq_decode._mm_kernel, dict(WORD_GROUPS=False, DOT_PRECISION="tf32",
                                                   BLOCK_M=16)),
           "h2mm": (gptq_h2mm._h2mm_kernel, dict(BLOCK_M=2))}
out = {}
for name, (fn, extra) in KERNELS.items():
    for on in (True, False):
        consts = COMMON | extra | {"PDL": on}
        sig = {a: PTRS.get(a, "constexpr" if a in consts else "i32") for a in fn.arg_names}
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=4, num_stages=2, launch_pdl=on))
        ops = [l.strip().lstrip("@%p0123456789! ") for l in k.asm["ptx"].splitlines()]
        ops = [o.split()[0] for o in ops if o.split()]
        ops = [o for o in ops if ".global" in o or o.split(".")[0] in ("atom", "red", "griddepcontrol")]
        out[f"{name} {on}"] = ops
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def ptx_ops():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


@pytest.mark.parametrize("name", ["gemv", "decode", "h2mm"])
def test_gemv_reads_only_weights_before_waiting(ptx_ops, name):
    ops = ptx_ops[f"{name} True"]
    assert ops.count("griddepcontrol.launch_dependents") == 1
    assert ops.count("griddepcontrol.wait") == 1
    cut = ops.index("griddepcontrol.wait")
    assert ops.index("griddepcontrol.launch_dependents") < cut
    before = [o for o in ops[:cut] if o != "griddepcontrol.launch_dependents"]
    after = ops[cut + 1:]
    # qweight words (b32) are all that is read early: no x or scale (b16), no workspace (fp32
    # .cg loads), no stores or atomics (the split-K tickets)
    assert before and all(o.startswith("ld.global") and o.endswith("b32") and ".cg" not in o
                          for o in before), before
    assert any(o.startswith("st.global") for o in after)
    assert any(o.startswith("atom") for o in after)  # split-K tickets, after the wait
    assert not any("griddepcontrol" in o for o in ptx_ops[f"{name} False"])


def test_off_without_a_gpu_or_when_asked(monkeypatch):
    x = torch.zeros(2)
    assert pdl.options(x) == {"PDL": False}  # no launch option a Triton without PDL would refuse
    assert pdl.flag(x) is False
    monkeypatch.setenv(pdl.ENV, "0")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    pdl.enabled.cache_clear()
    try:
        assert pdl.enabled(0) is False  # asked off: no CUDA query at all
    finally:
        pdl.enabled.cache_clear()
