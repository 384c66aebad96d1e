"""Write a large random GPTQ checkpoint without downloads (benchmarks on a GPU machine).

    python bench/make_checkpoint.py --preset llama3-8b --out /tmp/llama3-8b-gptq [--device cuda]

Presets: llama3-8b (Llama-3-8B shapes, 4-bit g128), llama3-8b-act (the same with act-order),
qwen-straddle (Qwen2-style with q/k/v biases and intermediate 13696: tp=2 splits down_proj at
6848, 64 rows into a group of 128), llama3-1b (Llama-3.2-1B shapes, tied embeddings), llama3-70b
(Llama-3-70B shapes: 80 layers, hidden 8192, 64/8 heads, intermediate 28672; `--layers` cuts it
for quick runs), small (a 2-layer model for smoke tests), small-act (the same with act-order).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tpserve.demo import write_random_checkpoint

LLAMA3_8B = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096,
                 intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                 rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, dtype="bfloat16",
                 bos_token_id=1, eos_token_id=2)
GPTQ4 = dict(quant_method="gptq", bits=4, group_size=128, desc_act=False, sym=True,
             checkpoint_format="gptq", pack_dtype="int32", lm_head=False)
PRESETS = {
    "llama3-8b": (LLAMA3_8B, GPTQ4),
    "llama3-8b-act": (LLAMA3_8B, {**GPTQ4, "desc_act": True}),
    "qwen-straddle": ({**LLAMA3_8B, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
                       "intermediate_size": 13696, "vocab_size": 151936}, GPTQ4),
    "llama3-1b": ({**LLAMA3_8B, "hidden_size": 2048, "intermediate_size": 8192,
                   "num_hidden_layers": 16, "num_key_value_heads": 8, "tie_word_embeddings": True},
                  GPTQ4),
    "llama3-70b": ({**LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672,
                    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8},
                   GPTQ4),
    "small": ({**LLAMA3_8B, "num_hidden_layers": 2, "hidden_size": 1024, "intermediate_size": 2816,
               "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 32000}, GPTQ4),
}
PRESETS["small-act"] = (PRESETS["small"][0], {**GPTQ4, "desc_act": True})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=list(PRESETS), default="llama3-8b")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, help="override num_hidden_layers (quick runs)")
    args = ap.parse_args()
    config, quant = PRESETS[args.preset]
    if args.layers:
        config = {**config, "num_hidden_layers": args.layers}
    t0 = time.perf_counter()
    write_random_checkpoint(Path(args.out), config, quant, device=args.device)
    print(f"wrote {args.preset} to {args.out} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
