"""Gemma 4 MoE on the GPU: the tiny routed-experts checkpoint of tests/test_gemma.py, loaded on
CUDA (fp32, graphs requested), against transformers' own class on the dequantized weights.

Routed experts pick the experts a step runs on the host, so such a model's steps are not captured
(`RankModel.not_capturable`); this checks that loading with CUDA graphs on still serves it, and
serves it right, at tp 1 and 2 (in-process ranks).   python bench/moe_check.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_gemma as tg  # noqa: E402  (the case's config, prompt, steps and tolerance)
import tiny  # noqa: E402

import tpserve  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp()))
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    path = tiny.make_checkpoint(args.out / "g_moe", **tg.CASES["gemma4_moe"])
    ref = tiny.reference_model(path)
    ref_logits = tiny.reference_logits(ref, tg.PROMPT)
    ref_tokens = tiny.reference_greedy(ref, tg.PROMPT, tg.STEPS)
    ok = True
    for tp in (1, 2):
        llm = tpserve.load(path, tp=tp, device=args.device, dtype=torch.float32)
        graphs = [r.graphs for r in llm.executor.ranks]
        err = (llm.logits(tg.PROMPT).cpu() - ref_logits).abs().max().item()
        tokens = llm.generate(tg.PROMPT, max_tokens=tg.STEPS, ignore_eos=True)
        good = err < 1e-3 and tokens == ref_tokens and all(g is None for g in graphs)
        ok &= good
        print(f"gemma4 MoE tp={tp} {args.device}: max |logit diff| {err:.2e}, greedy tokens "
              f"{'equal' if tokens == ref_tokens else f'differ: {tokens} vs {ref_tokens}'}, graphs "
              f"{'none (eager)' if all(g is None for g in graphs) else 'captured'}: "
              f"{'PASS' if good else 'FAIL'}")
        llm.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
