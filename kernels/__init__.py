"""tpserve's compute kernels (imported as `tpserve.kernels`): a leaf package that imports nothing
from tpserve. It takes plain tensors, a `GPTQWeight` (the GPTQ shard, defined here and built by
the loader) and a `HeadFormat`.

Each kernel module holds a Triton kernel for CUDA beside the torch reference it is tested against
and prints its error against it when run (`python -m tpserve.kernels.gptq_gemv`):
  gptq_weight   the GPTQ shard, its reference dequantization and matmul (torch only)
  gptq_common   shared Triton pieces: field extraction, zeros, x loads, split-K
  gptq_launch   their host side: configs, tuning key, launch, arguments, split-K workspace
  gptq_h2       one qweight word's dot product in fp16x2 (the fast GEMV path)
  gptq_gemv     M = 1;  gptq_decode  2 <= M <= 16;  gptq_prefill  M > 16
  fixed_sum     a decode GEMV's output as a fixed-point sum that its consumer takes
  head_kernels  int8 and Q8_0 vocabulary tables: head matmul and row gather
  tuning        the autotuner setup they share (disk-cached results)
  dispatch      which of them runs (Triton on CUDA, the reference elsewhere)
"""

from .dispatch import (HeadFormat, dequant_rows, gptq_matmul, head_matmul, int8_matmul,
                       q8_0_matmul)
from .gptq_weight import GPTQWeight


def __getattr__(name):
    # The head formats' quantize helpers live beside their Triton kernels; importing that module
    # (and triton) is left to first use, so `import tpserve` never needs it.
    if name in ("quantize_int8", "quantize_q8_0"):
        from . import head_kernels
        return getattr(head_kernels, name)
    raise AttributeError(f"module 'tpserve.kernels' has no attribute {name!r}")


__all__ = ["GPTQWeight", "HeadFormat", "dequant_rows", "gptq_matmul", "head_matmul", "int8_matmul",
           "q8_0_matmul", "quantize_int8", "quantize_q8_0"]
