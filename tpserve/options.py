"""Deployment options: one frozen dataclass, validated once, shared by `tpserve.load` and the CLI;
and the CLI flags that fill it, defined once here.

Everything that can be checked without starting Ray or reading a weight is checked here, so a
bad `--tp`, `--device` or `--port` costs a sentence, not a traceback after the model loaded.
"""

from __future__ import annotations

import argparse
import socket
from dataclasses import dataclass

import torch

from tpserve.errors import TpserveError

BACKENDS = ("local", "ray")
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float16", "bfloat16")
LM_HEADS = ("auto", "dense", "int8", "q8_0", "gptq")


def _positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise TpserveError(f"{name}={value!r} is invalid; use a positive integer")


@dataclass(frozen=True)
class DeployOptions:
    tp: int = 1
    backend: str = "local"
    device: str = "cpu"
    dtype: torch.dtype | None = None  # None: the config's
    max_model_len: int | None = None  # None: the config's
    num_slots: int = 8
    lm_head: str = "auto"

    def __post_init__(self):
        _positive("tp", self.tp)
        _positive("num_slots (--max-num-seqs)", self.num_slots)
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)
        if self.backend not in BACKENDS:
            raise TpserveError(f"backend={self.backend!r} is not known; use one of {BACKENDS}")
        if self.device not in DEVICES:
            raise TpserveError(f"device={self.device!r} is not supported; use cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise TpserveError("device='cuda' was asked for but this machine has no usable CUDA "
                               "GPU; use --device cpu or run on a GPU node")
        if isinstance(self.dtype, str):
            if self.dtype not in DTYPES:
                raise TpserveError(f"dtype={self.dtype!r} is not supported; use one of {DTYPES}")
            object.__setattr__(self, "dtype", getattr(torch, self.dtype))
        if self.lm_head not in LM_HEADS:
            raise TpserveError(f"lm_head mode {self.lm_head!r} is not known; use one of {LM_HEADS}")

    def check_model(self, cfg) -> None:
        """tp against the model's heads and MLP: the shard plan refuses what cannot be split."""
        from tpserve.model.shard_plan import ShardPlan
        ShardPlan.build(cfg, self.tp)


def check_port(host: str, port: int) -> None:
    """Refuse a port that is taken now, before minutes of loading find it out."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise TpserveError(f"cannot listen on {host}:{port} ({e.strerror}); pick another "
                               f"--port or stop what holds it") from None


def add_deploy_arguments(p: argparse.ArgumentParser, tp_required: bool = False) -> None:
    """The flags of DeployOptions and the Ray address, for every command that loads a model."""
    p.add_argument("--model", help="GPTQ checkpoint folder (default: the embedded demo model)")
    p.add_argument("--tp", "--tensor-parallel-size", "-tp", type=int, required=tp_required,
                   default=None if tp_required else 1, help="tensor-parallel size (ranks)")
    p.add_argument("--backend", choices=BACKENDS, default="ray",
                   help="ray: one Ray actor per rank + ZMQ coordinator; local: ranks as threads")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a private "
                                     "local cluster)")
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="where the ranks and the embedding and lm_head run")
    p.add_argument("--dtype", choices=DTYPES,
                   help="compute dtype (default: float32 on CPU, else the config's)")
    p.add_argument("--lm-head", choices=LM_HEADS, default="auto",
                   help="lm_head format (auto: the checkpoint's GPTQ head, else "
                        "int8 for tables of 64 MiB or more, else dense)")


def options_from_args(args) -> DeployOptions:
    dtype = args.dtype or ("float32" if args.device == "cpu" else None)
    return DeployOptions(tp=args.tp, backend=args.backend, device=args.device, dtype=dtype,
                         max_model_len=getattr(args, "max_model_len", None),
                         num_slots=getattr(args, "max_num_seqs", 8), lm_head=args.lm_head)
