"""The wire format between the coordinator and the ranks: msgpack header + raw tensor frames.

A message is a ZMQ multipart: frame 0 is a msgpack map

    {"v": 1, "op": str, "step": int, "seq": int, "rank": int, ..., "tensors": [{"dtype", "shape"}]}

and each following frame holds one tensor's bytes (C order). Nothing is ever pickled. `decode`
validates everything a peer controls (version, op, key types, dtype whitelist, shape against byte
length, frame count and size) and raises `WireError`, which receivers log and drop.
"""

from __future__ import annotations

import math
import warnings

import msgpack
import torch

from tpserve.errors import TpserveError
from tpserve.model.kv_cache import StepPlan

VERSION = 1
OPS = {"hello", "setup", "ready", "params", "step", "reduce", "sum", "result", "error", "stop"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8}
_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 1 << 20
MAX_TENSORS = 16  # a result of logits too large for one frame travels as row chunks
MAX_CHUNK = 1 << 30  # bytes of one chunk (`chunk_rows`)
MAX_DIMS = 4
MAX_FRAME = 1 << 31  # 2 GiB; a step's hidden states are far smaller


class WireError(TpserveError):
    """A malformed or unexpected message."""


def encode(header: dict, tensors: list[torch.Tensor] = ()) -> list:
    """Header dict + tensors -> frames (tensor frames are zero-copy views where possible)."""
    specs, frames = [], []
    for t in tensors:
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        specs.append({"dtype": _NAMES[t.dtype], "shape": list(t.shape)})
        frames.append(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")
    head = msgpack.packb({"v": VERSION, **header, "tensors": specs}, use_bin_type=True)
    return [head, *frames]


def chunk_rows(t: torch.Tensor) -> list[torch.Tensor]:
    """t split along rows into pieces of at most MAX_CHUNK bytes (at least one row each), for
    tensors larger than one frame carries; the receiver concatenates them."""
    row = max(1, t[0].numel() * t.element_size()) if len(t) else 1
    pieces = list(t.split(max(1, MAX_CHUNK // row))) if len(t) else [t]
    if len(pieces) > MAX_TENSORS - 1:
        raise WireError(f"a result of {list(t.shape)} {t.dtype} needs {len(pieces)} frames of "
                        f"1 GiB, more than one message carries; ask for fewer rows per step")
    return pieces


def uint(h: dict, key: str) -> int:
    """h[key] (0 when absent) if it is a non-negative integer, else WireError."""
    v = h.get(key, 0)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise WireError(f"header key {key!r}={v!r} must be a non-negative integer")
    return v


def decode(frames: list, max_frame: int = MAX_FRAME) -> tuple[dict, list[torch.Tensor]]:
    """Frames -> (validated header, tensors). Raises WireError naming what is wrong."""
    if not frames:
        raise WireError("empty message")
    raw = frames[0].bytes if hasattr(frames[0], "bytes") else bytes(frames[0])
    if len(raw) > MAX_HEADER:
        raise WireError(f"header of {len(raw)} bytes exceeds {MAX_HEADER}")
    try:
        h = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=0,
                            max_array_len=1 << 16, max_map_len=64)
    except Exception as e:
        raise WireError(f"header is not valid msgpack ({type(e).__name__})") from None
    if not isinstance(h, dict):
        raise WireError("header is not a msgpack map")
    if type(h.get("v")) is not int or h["v"] != VERSION:  # True == 1 in Python: check the type
        raise WireError(f"protocol version {h.get('v')!r} is not {VERSION}")
    if not isinstance(h.get("op"), str) or h["op"] not in OPS:
        raise WireError(f"unknown op {h.get('op')!r}")
    for key in ("step", "seq", "rank"):
        uint(h, key)
    specs = h.get("tensors", [])
    if not isinstance(specs, list) or len(specs) > MAX_TENSORS:
        raise WireError(f"'tensors' must be a list of at most {MAX_TENSORS} specs")
    if len(specs) != len(frames) - 1:
        raise WireError(f"header announces {len(specs)} tensors but {len(frames) - 1} frames came")
    tensors = []
    for spec, frame in zip(specs, frames[1:]):
        if not isinstance(spec, dict) or not isinstance(spec.get("dtype"), str) or \
                spec["dtype"] not in DTYPES:
            raise WireError(f"tensor spec {spec!r} has no allowed dtype ({sorted(DTYPES)})")
        shape = spec.get("shape")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise WireError(f"tensor shape {shape!r} must be a list of at most {MAX_DIMS} "
                            f"non-negative integers")
        dtype = DTYPES[spec["dtype"]]
        buf = frame.buffer if hasattr(frame, "buffer") else frame
        nbytes = len(buf) if not isinstance(buf, memoryview) else buf.nbytes
        if nbytes > max_frame:
            raise WireError(f"frame of {nbytes} bytes exceeds the limit of {max_frame}")
        want = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if nbytes != want:
            raise WireError(f"tensor {spec['dtype']}{shape} needs {want} bytes but its frame has "
                            f"{nbytes}")
        if want == 0:
            tensors.append(torch.empty(shape, dtype=dtype))
        else:
            with warnings.catch_warnings():  # zero-copy view of a read-only ZMQ frame
                warnings.simplefilter("ignore", UserWarning)
                flat = torch.frombuffer(buf, dtype=torch.uint8)
            tensors.append(flat.view(dtype).view(shape))
    return h, tensors


def plan_from_wire(d, num_tokens: int) -> StepPlan:
    """A step header's plan (`StepPlan.to_wire`) for a step of `num_tokens` rows, checked."""
    if not isinstance(d, dict):
        raise WireError("step header has no plan map")
    lists = [d.get(k) for k in ("slots", "starts", "lens")]
    if not all(isinstance(x, list) and all(isinstance(i, int) for i in x) for x in lists) or \
            len({len(x) for x in lists}) != 1:
        raise WireError("plan slots/starts/lens must be integer lists of one length")
    copies = d.get("copies", [])
    if not isinstance(copies, list) or not all(
            isinstance(c, list) and len(c) == 3 and all(isinstance(i, int) for i in c)
            for c in copies):
        raise WireError("plan copies must be [src, dst, n] integer triples")
    plan = StepPlan(*lists, out_rows=d.get("out_rows"), copies=[tuple(c) for c in copies])
    if plan.num_tokens != num_tokens:
        raise WireError(f"plan covers {plan.num_tokens} tokens but h has {num_tokens} rows")
    if plan.out_rows is not None and (not isinstance(plan.out_rows, list) or not all(
            isinstance(i, int) and 0 <= i < num_tokens for i in plan.out_rows)):
        raise WireError("plan out_rows must be row indices of h")
    return plan
