"""The real distributed path: Ray rank actors + the ZMQ coordinator, on CPU."""

import os
import threading

import pytest
import torch

import tpserve
from tpserve.serve.engine import Engine
from tpserve.serve.sampling_params import SamplingParams

from test_peer_fixtures import FIXTURES

# fp32 on both sides; the ZMQ all-reduce sums in fp32 in rank order exactly like LocalComm, so the
# only difference from the in-process run is none at all, and from tp=1 summation order (~1e-6).
ATOL = 1e-4


@pytest.fixture(scope="module")
def ray_llm(ray_cluster):
    llm = tpserve.load(FIXTURES / "llama_g128_sym", tp=4, backend="ray", dtype=torch.float32)
    yield llm
    llm.close()


def test_tp4_over_ray_matches_the_in_process_reference(ray_llm):
    path = FIXTURES / "llama_g128_sym"
    ids = [1, 17, 42, 99, 3, 250, 128, 64, 7, 200, 33, 5]
    local4 = tpserve.load(path, tp=4, dtype=torch.float32)
    local1 = tpserve.load(path, tp=1, dtype=torch.float32)
    # the fixture's tp=4 shards start inside groups (o_proj K=192 splits at 48/96/144, g128)
    assert local4.executor.ranks[1].layers[0].self_attn.o_proj.weight.group_offset == 48
    got = ray_llm.logits(ids)
    assert torch.equal(got, local4.logits(ids))  # same math, same reduction order: bit-exact
    assert (got - local1.logits(ids)).abs().max() < ATOL
    want = local1.generate(ids, max_tokens=16, ignore_eos=True)
    assert ray_llm.generate(ids, max_tokens=16, ignore_eos=True) == want
    stats = ray_llm.executor.stats
    assert stats.allreduce_count > 0 and stats.dropped_messages == 0


def test_concurrent_requests_of_different_lengths_match_sequential_runs(ray_llm):
    prompts = [[1, 5, 9][: n % 3 + 1] + list(range(10, 10 + 4 * n)) for n in range(6)]
    want = [ray_llm.generate(p, max_tokens=6 + i, ignore_eos=True) for i, p in enumerate(prompts)]
    engine = Engine(ray_llm).start()
    got = {}

    def run(i):
        got[i] = engine.generate(prompts[i], SamplingParams(max_tokens=6 + i, ignore_eos=True))
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    engine.stop()
    assert [got[i] for i in range(len(prompts))] == want
    # they really were batched: fewer steps than tokens
    assert engine.stats.steps < engine.stats.tokens_generated


def test_cpu_ranks_share_the_cores_left_to_them(ray_llm, monkeypatch):
    """Each CPU rank runs (its node's cores - TPSERVE_CPU_RESERVED_CORES) // (ranks on its node)
    torch threads, at least one (more threads than cores made every small op wait for a parked
    thread); a malformed setting is refused with its name."""
    from tpserve.errors import TpserveError
    from tpserve.runtime.ray_placement import RESERVED_ENV, reserved_cores, share_threads
    cores = len(os.sched_getaffinity(0))
    assert [n["threads"] for n in ray_llm.executor.nodes] == [max(1, (cores - 1) // 4)] * 4
    # a node of 32 cores holding one rank, one of 16 holding four, one of 4 holding eight
    assert [share_threads(1, 1, 32), share_threads(4, 1, 16), share_threads(8, 1, 4)] == [31, 3, 1]
    assert share_threads(2, 0, 16) == 8
    monkeypatch.delenv(RESERVED_ENV, raising=False)
    assert reserved_cores() == 1
    for bad in ("-1", "two", "1.5"):
        monkeypatch.setenv(RESERVED_ENV, bad)
        with pytest.raises(TpserveError, match=f"{RESERVED_ENV}='{bad}' is not a count of cores"):
            reserved_cores()


def test_ranks_run_the_drivers_tpserve_and_a_rank_with_other_code_is_refused(ray_llm):
    """Every rank reports a hash of the tpserve source it imported (`code_fingerprint`), equal to
    the driver's here; a rank whose code differs (Ray puts the launch folder on the ranks' path,
    where another checkout shadows the installed tpserve) is refused with both folders named."""
    from tpserve.errors import TpserveError
    from tpserve.runtime.ray_placement import check_nodes, code_fingerprint
    nodes = ray_llm.executor.nodes
    assert all(tuple(n["code"]) == code_fingerprint() for n in nodes)
    check_nodes([], nodes, FIXTURES / "llama_g128_sym", "cpu")  # the real ones pass
    other = [{**nodes[0], "code": ("0" * 16, "/tmp/launch/tpserve")}, *nodes[1:]]
    with pytest.raises(TpserveError, match="runs the tpserve in /tmp/launch/tpserve, which "
                                           "differs from the driver's"):
        check_nodes([], other, FIXTURES / "llama_g128_sym", "cpu")
    older = [{k: v for k, v in nodes[0].items() if k != "code"}]  # a tpserve without the hash
    with pytest.raises(TpserveError, match="runs the tpserve in a tpserve too old to say where"):
        check_nodes([], older, FIXTURES / "llama_g128_sym", "cpu")
