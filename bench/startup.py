"""Launch to healthy: seconds from `tpserve launch` to a 200 from /health, twice in a row (the
second launch finds Triton's compiled kernels and tuning results in its on-disk cache).

    python bench/startup.py --model PATH [--tp 1] [--device cuda] [--backend local] [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_to_healthy(args) -> float:
    port = free_port()
    cmd = [sys.executable, "-m", "tpserve.cli", "launch", "--model", args.model, "--tp",
           str(args.tp), "--device", args.device, "--backend", args.backend, "--port", str(port)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None and time.perf_counter() - t0 < args.timeout:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                time.sleep(0.2)
        raise SystemExit(f"no healthy server within {args.timeout}s: {proc.stderr.read()[-2000:]}")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="local")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args()
    times = [launch_to_healthy(args) for _ in range(args.runs)]
    print(json.dumps({"launch_to_healthy_s": times, "model": args.model, "tp": args.tp,
                      "device": args.device, "backend": args.backend}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
