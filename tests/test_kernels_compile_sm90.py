"""A step's Triton kernels compile for sm_90 (H100/H200), on this machine without a GPU,
with the launches the kernel tests make under the interpreter (`compile_sm90.py`): an op or a
branch that only the GPU compiler refuses fails here, not first on the device. The PTX also
holds what the design says: PDL's wait in the GEMV, release and a wait before any memory access in
the step's other kernels, the
fixed-point GEMV's integer reduction (`red.global.add.u64`), and its readers' loads, a barrier,
then the zero stores (or, with TPSERVE_FIXED_TAKE=exchange, their atomic exchanges)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from compile_sm90 import FIXED_INPUTS

SCRIPT = Path(__file__).parent / "compile_sm90.py"
STEP_KERNELS = {"_gemv_kernel", "_mm_kernel", "_h2mm_kernel", "_prefill_kernel", "_rms_norm_kernel",
                "_silu_mul_kernel", "_rotary_store_kernel", "_decode_kernel", "_head_gemv_kernel",
                "_head_mm_kernel", "_one_shot_kernel", "_one_shot_norm_kernel"}


def _run(*args, **env_vars) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "TPSERVE_FIXED_TAKE")} | env_vars
    r = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                       env=env, timeout=900, cwd=SCRIPT.parent.parent)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_a_steps_kernels_compile_for_sm90(tmp_path):
    launches = tmp_path / "launches.json"
    _run("record", str(launches))
    results = json.loads(_run("compile", str(launches)))
    failed = [(r["kernel"], r["error"]) for r in results if r["error"]]
    assert not failed, failed
    assert STEP_KERNELS <= {r["kernel"] for r in results}
    gemvs = [r for r in results if r["kernel"] == "_gemv_kernel"]
    assert all(r["ptx"]["griddepcontrol.wait"] for r in gemvs)  # PDL: waits before reading x
    assert not any(r["ptx"]["waits first"] for r in gemvs)  # ... having loaded weights before
    # the step's other kernels, launched with PDL too (pdl.step_options; the one-shot
    # all-reduces not yet): release, and wait before any global memory access
    for name in ("_rms_norm_kernel", "_silu_mul_kernel", "_rotary_store_kernel", "_decode_kernel",
                 "_one_shot_kernel", "_one_shot_norm_kernel", "_head_gemv_kernel"):
        compiled = [r for r in results if r["kernel"] == name]
        assert compiled and all(r["ptx"]["griddepcontrol.launch_dependents"]
                                and r["ptx"]["waits first"] for r in compiled), name
    # the down projection reading silu(gate) * up from a gate/up sum, and a GEMV clearing one
    assert any(r["sig"]["x_ptr"] == "*i64" for r in gemvs)
    assert any(r["consts"]["CLEAR"] and r["ptx"]["st.global"] for r in gemvs)
    fixed = [r for r in gemvs if r["sig"]["out_ptr"] == "*i64"]
    assert fixed and all(r["ptx"]["red.global"] and r["ptx"]["add.u64"] for r in fixed)
    for name, arg in FIXED_INPUTS.items():
        readers = [r for r in results if r["kernel"] == name and r["sig"][arg] == "*i64"]
        assert readers and all(r["ptx"]["barrier between"] for r in readers), name
        if name != "_one_shot_norm_kernel":  # (its flags are exchanged: exch.b64 anyway)
            assert not any(r["ptx"]["exch.b64"] for r in readers), name
    # the exchange take (TPSERVE_FIXED_TAKE=exchange): one atomic exchange per element
    exchange = json.loads(_run("compile", str(launches), "fixed-readers",
                               TPSERVE_FIXED_TAKE="exchange"))
    assert {r["kernel"] for r in exchange} == set(FIXED_INPUTS)
    assert all(r["ptx"]["exch.b64"] and not r["error"] for r in exchange), exchange
