"""Where a TP deployment departs from tp=1: the first layer whose output differs, then, in that
layer, each rank's shard product against the matching slice of the unsharded product on the same
input, naming the rank, the weight, its shard boundaries and its group offset (`tpserve verify`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tpserve.model.gptq_shard import GPTQWeight
from tpserve.model.kv_cache import StepPlan
from tpserve.model.linear import Linear

# A shard product and the unsharded product's slice see the same input and, if the shard was read
# right, the same dequantized values, in fp32: only the matmul blocking differs (~1e-7).
SHARD_RTOL = 1e-4


@dataclass
class Localisation:
    layer: int | None  # first layer whose output differs beyond tolerance
    layer_max_rel: float
    shards: list[dict] = field(default_factory=list)  # rank, weight, rows, cols, group_offset...
    note: str = ""


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.shape != want.shape:
        return float("inf")
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()


def _layer_outputs(executor, h: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's output [T, hidden] of one prefill on an in-process executor."""
    captured: list[torch.Tensor] = []
    executor.step(h, StepPlan(slots=[0], starts=[0], lens=[h.shape[0]]), capture=captured)
    return captured


def localise(local, ref1, ids: list[int], tol) -> Localisation:
    """First differing layer of in-process `local` (tp=N) vs `ref1` (tp=1), then its bad shards
    (tol: the `verify.Tolerance` whose `rel` bounds a layer's output)."""
    h = ref1.head.embed(torch.as_tensor(ids))
    inputs: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(ref1.executor.ranks[0].layers):
        for name, (mod, _) in layer.linears().items():
            hooks.append(mod.register_forward_pre_hook(
                lambda m, args, key=(i, name): inputs.__setitem__(key, args[0].float())))
    try:
        want = _layer_outputs(ref1.executor, h)
    finally:
        for hook in hooks:
            hook.remove()
    got = _layer_outputs(local.executor, h)
    rels = [rel_error(a, b) for a, b in zip(got, want)]
    bad = next((i for i, r in enumerate(rels) if r > tol.rel), None)
    if bad is None:
        return Localisation(None, max(rels), note=(
            f"the in-process run at tp={local.tp} matches tp=1 at every layer: the difference "
            f"arises outside the shards (rank processes, transport, or the coordinator's head)"))
    shards = []
    full_layer, plan = ref1.executor.ranks[0].layers[bad], local.executor.plan
    full = full_layer.linears()
    for r, rank in enumerate(local.executor.ranks):
        for name, (linear, w_rank) in rank.layers[bad].linears().items():
            w_full = full[name][1]
            w = linear.weight if isinstance(linear, Linear) else None
            (k0, k1), (n0, n1) = plan.linear_spans(r, name, *w_full.shape, layer=bad)
            x = inputs[(bad, name)][:, k0:k1]  # the unsharded layer's input, this rank's rows
            rel = rel_error(x @ w_rank, x @ w_full[k0:k1, n0:n1])
            if rel > SHARD_RTOL:
                gptq = isinstance(w, GPTQWeight)
                shards.append(dict(
                    rank=r, weight=name, rows=[k0, k1], cols=[n0, n1], max_rel=rel,
                    group_offset=w.group_offset if gptq else None,
                    expected_group_offset=(0 if w.g_idx is not None else k0 % w.group_size)
                    if gptq else None))
    note = "" if shards else (
        "every rank's weight shard gives the unsharded product on the same input: the difference "
        "arises in attention, the all-reduce or a replicated tensor (norm, bias) of this layer")
    return Localisation(bad, rels[bad], shards, note)


