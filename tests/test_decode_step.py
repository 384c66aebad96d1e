"""The static-shape decode step: batch buckets, padding rows aimed at the scratch slot, and the
padded step (what a captured step runs) against the unpadded one, on CPU."""

import pytest
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


def test_prefill_steps_as_decode_rows_run_as_the_eager_step_does(demo_checkpoint):
    """What a captured prefill step runs (`graphs.prefill_rows`): the step's tokens as decode
    rows, row i of a sequence at position start + i attending to its first start + i + 1 keys,
    padded to the bucket with rows aimed at the scratch slot. Its rows and the cache rows equal
    the eager step's, for a first prompt, a chunk continuing it, and a step that prefills a new
    prompt beside a decode row; a step of prompts with more tokens than the positions a prompt may
    end within (several short prompts) runs as rows too; a prompt ending past those positions
    runs eagerly."""
    llm = tpserve.load(demo_checkpoint, tp=2, dtype=torch.float32, num_slots=5)
    try:
        ex, scratch = llm.executor, llm.executor.ranks[0].cache.num_slots
        run_rows = ex.ranks[0].run_prefill_rows
        calls = []
        ex.ranks[0].run_prefill_rows = lambda *a: calls.append(1) or run_rows(*a)
        first, more, new = [5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16], [17, 18, 19]
        n = len(first) + len(more)

        def steps(a: int, b: int):  # the same steps on slots a and b
            return [(StepPlan([a], [0], [len(first)]), first),
                    (StepPlan([a], [len(first)], [len(more)]), more),
                    (StepPlan([a, b], [n, 0], [1, len(new)]), [20] + new)]
        got = {}
        def buckets(sizes):  # a GPU rank's buckets (`run_prefill_rows`); none on CPU
            for rank in ex.ranks:
                rank.prefill_sizes, rank.prefill_positions = sizes, 16
        for sizes, (a, b) in (([], (0, 2)), ([16, 32], (1, 3))):  # eager; as rows
            buckets(sizes)
            got[a] = [ex.step(llm.head.embed(torch.tensor(t)), p) for p, t in steps(a, b)]
        assert len(calls) == 3  # slots 1 and 3's steps ran as rows
        for want, rows in zip(got[0], got[1]):
            assert torch.allclose(rows, want, rtol=1e-4, atol=1e-4)
        for rank in ex.ranks:
            for k, v in zip(rank.cache.groups[""].k, rank.cache.groups[""].v):
                for eager, rows, m in ((0, 1, n + 1), (2, 3, len(new))):
                    assert torch.allclose(k[rows, :m], k[eager, :m], rtol=1e-5, atol=1e-5)
                    assert torch.allclose(v[rows, :m], v[eager, :m], rtol=1e-5, atol=1e-5)
                assert not k[4:scratch].any()  # a slot no sequence owns: untouched
        # two new prompts of 24 tokens together, each ending within 16 positions: as rows, as
        # the eager step (on other slots) gives them
        two = llm.head.embed(torch.arange(30, 54))
        rows = ex.step(two, StepPlan([4, 3], [0, 0], [12, 12]))
        assert len(calls) == 4
        buckets([])
        want = ex.step(two, StepPlan([0, 2], [0, 0], [12, 12]))
        assert torch.allclose(rows, want, rtol=1e-4, atol=1e-4)
        # a prompt chunk ending past the positions (at 17 of 16) runs eagerly; a new prompt
        # beside it later as rows
        buckets([16, 32])
        ex.step(llm.head.embed(torch.tensor([1, 2, 3, 4])), StepPlan([1], [n + 1], [4]))
        assert len(calls) == 4
        ex.step(llm.head.embed(torch.tensor([3] * 4)), StepPlan([4], [0], [4]))
        assert len(calls) == 5
    finally:
        llm.close()


# A step mixing a continued prefill, a fresh prefill and decode rows: slots 2 and 0 batch
# together, the long decode row (slot 1) alone (group_sequences). And steps of first prefills
# only (every start 0), which attend on the step's own q/k/v without reading the cache: one
# sequence (no padding) and three of different lengths.
MIXED = StepPlan(slots=[2, 0, 3, 1], starts=[5, 0, 12, 30], lens=[4, 7, 1, 1])
FRESH = [StepPlan(slots=[2], starts=[0], lens=[9]),
         StepPlan(slots=[3, 0, 1], starts=[0, 0, 0], lens=[5, 11, 1])]


@pytest.mark.parametrize("plan,kv_group", [(MIXED, None), (FRESH[0], 3), (FRESH[1], 3),
                                           (FRESH[1], None)])
@pytest.mark.parametrize("window,softcap", [(None, None), (4, None), (None, 5.0)])
def test_a_step_attends_like_each_sequence_alone(plan, kv_group, window, softcap):
    """Batched attention of a step against a naive loop over sequences and heads; every cache
    entry a sequence must not see (other slots, its own slot past its end) holds NaN. kv_group
    3: q head h reads kv head h // 3; None: through kv_map (an uneven split's)."""
    from tpserve.model.cache_attention import attention
    from tpserve.model.kv_cache import KVCache
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, hd, slots, max_len = 6, 2, 8, 4, 40
    cache = KVCache(1, slots, max_len, kv_heads, hd, torch.float32, "cpu")
    cache.k[0].fill_(float("nan"))
    cache.v[0].fill_(float("nan"))
    for slot, start in zip(plan.slots, plan.starts):  # what earlier steps left in the cache
        cache.k[0][slot, :start] = torch.randn(start, kv_heads, hd, generator=gen)
        cache.v[0][slot, :start] = torch.randn(start, kv_heads, hd, generator=gen)
    t = plan.num_tokens
    q = torch.randn(t, heads, hd, generator=gen)
    k, v = torch.randn(t, kv_heads, hd, generator=gen), torch.randn(t, kv_heads, hd, generator=gen)
    kv_map = torch.tensor([h * kv_heads // heads for h in range(heads)])  # uneven-safe map
    if kv_group is None:
        kv_map = kv_map.flip(0)  # a map that is not h // group
    before = {s: (cache.k[0][s].clone(), cache.v[0][s].clone()) for s in plan.slots}
    got = attention(q, k, v, cache, 0, plan, kv_map, 0.3, window, softcap, kv_group)

    row = 0
    for slot, start, n in zip(plan.slots, plan.starts, plan.lens):
        keys = torch.cat([before[slot][0][:start], k[row:row + n]])  # (end, kv_heads, hd)
        vals = torch.cat([before[slot][1][:start], v[row:row + n]])
        assert torch.equal(cache.k[0][slot, :start + n], keys)  # this step's k/v were written
        for j in range(n):
            pos = start + j
            for h in range(heads):
                s = keys[:pos + 1, kv_map[h]] @ q[row + j, h] * 0.3
                if softcap is not None:
                    s = torch.tanh(s / softcap) * softcap
                if window is not None:
                    s[:max(0, pos + 1 - window)] = float("-inf")
                want = s.softmax(0) @ vals[:pos + 1, kv_map[h]]
                assert torch.allclose(got[row + j, h], want, atol=1e-5), (slot, j, h)
        row += n


def test_a_long_prompt_does_not_pad_the_decode_rows_beside_it():
    from tpserve.model.cache_attention import group_sequences
    # 31 decode rows at position 1000 and one 512-token prompt: two batches, not one 32 x 512
    starts, lens = [1000] * 31 + [0], [1] * 31 + [512]
    assert sorted(map(sorted, group_sequences(starts, lens))) == [list(range(31)), [31]]
    # prompts of similar length, and decode rows of similar context, batch together
    assert len(group_sequences([0, 0, 0, 40, 41], [30, 32, 28, 1, 1])) == 2
    assert len(group_sequences([0, 0, 7], [16, 15, 1])) == 1


def test_rank_zeros_answer_is_checked_before_it_reaches_the_sampler():
    from tpserve.model.rank_head import malformed
    plan = StepPlan([0, 1], [0, 4], [3, 1], out_rows=[2, 3])
    good = torch.tensor([5, 9])
    assert malformed(good, torch.zeros(2, 10), plan, 10) is None
    assert "argmax [1]" in malformed(good[:1], None, plan, 10)  # a row missing
    assert "argmax" in malformed(torch.tensor([5, 10]), None, plan, 10)  # outside the vocabulary
    assert "logits [2, 9]" in malformed(good, torch.zeros(2, 9), plan, 10)
    assert "float16" in malformed(good, torch.zeros(2, 10, dtype=torch.float16), plan, 10)
