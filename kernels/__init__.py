"""tpserve's compute kernels (imported as `tpserve.kernels`).

Each kernel module holds a Triton kernel for CUDA beside the torch reference it is tested against;
the public functions here pick one by the device of their input and say which, once, in the log.
"""

from tpserve.kernels.gptq_matmul import (dequant_rows, gptq_matmul, int8_matmul,
                                         prepare_act_order, q8_0_matmul)


def __getattr__(name):
    # The head formats' quantize helpers live beside their Triton kernels; importing that module
    # (and triton) is left to first use, so `import tpserve` never needs it.
    if name in ("quantize_int8", "quantize_q8_0"):
        from tpserve.kernels import head_kernels
        return getattr(head_kernels, name)
    raise AttributeError(f"module 'tpserve.kernels' has no attribute {name!r}")


__all__ = ["dequant_rows", "gptq_matmul", "int8_matmul", "prepare_act_order", "q8_0_matmul",
           "quantize_int8", "quantize_q8_0"]
