"""The static-shape decode step: batch buckets, padding rows aimed at the scratch slot, and the
padded step (what a captured step runs) against the unpadded one, on CPU."""

import torch

import tpserve
from tpserve.model.graphs import buckets_for
from tpserve.model.kv_cache import StepPlan


def test_buckets_cover_every_batch_up_to_the_slots():
    for slots in (1, 3, 8, 9, 40, 100):
        b = buckets_for(slots)
        assert b[0] == 1 and b[-1] == slots and b == sorted(set(b))
    assert buckets_for(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]


def test_padded_decode_step_matches_the_exact_one_and_spares_the_real_slots(demo_checkpoint):
    llm = tpserve.load(demo_checkpoint, tp=2, dtype=torch.float32, num_slots=8)
    try:
        rank = llm.executor.ranks[0]
        prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
        for slot, p in enumerate(prompts):  # prefill three sequences into slots 0..2
            llm.executor.step(llm.head.embed(torch.tensor(p)),
                              StepPlan(slots=[slot], starts=[0], lens=[len(p)]))
        plan = StepPlan(slots=[0, 1, 2], starts=[4, 2, 3], lens=[1, 1, 1])
        h = llm.head.embed(torch.tensor([20, 21, 22]))
        before = [c.clone() for c in rank.cache.groups[""].k]
        exact = llm.executor.step(h, plan)  # every rank, unpadded
        # Padded to the bucket of 4: the fourth row writes only to the scratch slot (index 8).
        futures = [llm.executor.pool.submit(r.run_padded, h, plan) for r in llm.executor.ranks]
        got = futures[0].result()
        assert got.shape == exact.shape
        # CPU matmuls block differently for 4 rows than for 3: last-bit differences only (the same
        # reason the GPU's eager step pads to the captured step's bucket).
        assert torch.allclose(got, exact, rtol=1e-5, atol=1e-5)
        after = rank.cache.groups[""].k
        for b, a in zip(before, after):
            assert torch.equal(a[3:8], b[3:8])  # slots no sequence owns: untouched
    finally:
        llm.close()
