"""tpserve's compute kernels (imported as `tpserve.kernels`).

Each kernel module holds a Triton kernel for CUDA beside the torch reference it is tested against;
the public functions here pick one by the device of their input and say which, once, in the log.
"""

from tpserve.kernels.gptq_matmul import gptq_matmul

__all__ = ["gptq_matmul"]
