"""The executor contract: what the engine, metrics, `LLM` and `tpserve verify` may ask of the ranks.

Two implementations: `LocalExecutor` (tp ranks as threads of this process, tests and
`backend="local"`) and `RayExecutor` (one Ray actor per rank, a ZMQ coordinator). Callers use only
what is declared here, never `isinstance` or `getattr` probes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from tpserve.model.kv_cache import StepPlan


@dataclass
class CommStats:
    """Counters of a rank group's all-reduces; they survive a rebuilt group."""
    steps: int = 0
    allreduce_count: int = 0
    allreduce_seconds: float = 0.0  # first partial in -> sum sent, summed over reductions
    dropped_messages: int = 0


@dataclass(frozen=True)
class RankPlacement:
    rank: int
    node: str  # Ray node id, or "local"
    device: str  # e.g. "cpu", "cuda:0"


class Executor(Protocol):
    backend: str  # "local" | "ray"
    tp: int
    num_slots: int
    max_len: int
    failures: int  # rank deaths or stalls detected
    stats: CommStats

    def step(self, h: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        """Run one step on every rank: h [T, hidden] -> the final hidden rows `plan.out_rows`."""

    head_bytes: int  # bytes of the head the ranks hold (`tpserve.model.rank_head`), else 0
    ranks_sample: bool  # the head is in the ranks' step, which samples: steps can burst

    def step_ids(self, ids: torch.Tensor, plan: StepPlan, need_logits: bool = True
                 ) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """A step from token ids [T] to (fp32 logits of the rows `plan.out_rows`, their argmax)
        where the ranks hold the head (`tpserve.model.rank_head`); None where they do not (the
        caller runs embed, `step` and the head). With need_logits=False the logits may be None:
        the caller takes the argmax only."""

    def decode_ids(self, ids: torch.Tensor, plan: StepPlan, steps: int) -> torch.Tensor | None:
        """`steps` greedy decode steps from token ids [b] (one per sequence of the decode plan
        `plan`) run by the ranks without the host in between: each step's argmax is the next
        step's input, one position further (`rank_head.decode_ids`). -> argmax [steps, b] on the
        host, or None where the ranks do not hold the head (the caller steps one at a time)."""

    def sample_ids(self, ids: torch.Tensor, plan: StepPlan, reqs, need_logits: bool):
        """A step of token ids whose requests (engine `Request`s) the ranks sample where the
        logits are (`tpserve.serve.rank_sampling`) -> ((token, logprob) per request, the fp32
        logits of `plan.out_rows` where need_logits); None where they do not (the caller
        samples `step_ids`' or `step`'s logits)."""

    def sample_burst(self, ids: torch.Tensor, plan: StepPlan, reqs, steps: int
                     ) -> list[list[tuple]] | None:
        """`steps` decode steps of `reqs` sampled by the ranks, each step's tokens fed to the
        next there -> per step, (token, logprob) per request; None where the ranks do not sample
        (the caller steps one at a time)."""

    def health(self) -> str | None:
        """None while every rank serves; else a sentence naming the dead or stuck ranks."""

    def placement(self) -> list[RankPlacement]:
        """Where each rank runs."""

    def recover(self) -> None:
        """Rebuild the rank group after a failure (a no-op where ranks cannot die alone)."""

    def close(self) -> None:
        """Stop the ranks and free what they hold. Never hangs."""
