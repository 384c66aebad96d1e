"""Each all-reduce path under the real Ray executor: same logits as the in-process ranks."""

import logging
import os

import pytest
import torch

import tpserve
from tpserve.model.kv_cache import StepPlan
from tpserve.runtime import shm

from test_peer_fixtures import FIXTURES

PATH = FIXTURES / "llama_g128_sym"
IDS = [1, 17, 42, 99, 3, 250, 128, 64]


@pytest.fixture(scope="module")
def local2():
    return tpserve.load(PATH, tp=2, dtype=torch.float32).logits(IDS)


@pytest.mark.parametrize("requested,path", [("auto", "shm"), ("zmq", "zmq"), ("gloo", "gloo")])
def test_each_path_over_ray_gives_the_in_process_logits(ray_cluster, local2, caplog, requested,
                                                        path):
    ours = f"{shm.PREFIX}{os.getpid()}-*"  # this driver's segments, not another run's
    before = set(shm.SHM_DIR.glob(ours))
    with caplog.at_level(logging.INFO, logger="tpserve.runtime.ray_executor"):
        llm = tpserve.load(PATH, tp=2, backend="ray", dtype=torch.float32, allreduce=requested)
    try:
        assert llm.executor.coord.path == path
        chosen = [r.getMessage() for r in caplog.records if "all-reduce path" in r.getMessage()]
        assert chosen and chosen[0].startswith(f"all-reduce path {path} (--allreduce {requested})")
        # fp32 partials of two ranks: every path sums them exactly as the in-process ranks do
        assert torch.equal(llm.logits(IDS), local2)
        stats = llm.executor.stats
        # two a layer, and one that hands rank 0's embedded rows to the others: `--head-at auto`
        # puts the head on rank 0 for CPU ranks on the driver's host, whatever the path
        assert llm.head is None
        assert stats.allreduce_count == 2 * llm.cfg.num_layers + 1
        assert stats.dropped_messages == 0
    finally:
        llm.close()
    assert set(shm.SHM_DIR.glob(ours)) == before  # no segment left behind


def test_an_impossible_choice_fails_before_any_rank_starts(ray_cluster):
    with pytest.raises(tpserve.TpserveError, match="allreduce='nccl' needs device='cuda'"):
        tpserve.load(PATH, tp=2, backend="ray", dtype=torch.float32, allreduce="nccl")


@pytest.mark.parametrize("requested", ["auto", "zmq"])
def test_the_head_on_rank0_gives_the_coordinators_logits_and_tokens(ray_cluster, local2,
                                                                    requested):
    """head_at='rank0' (what GPU ranks on one host get): steps carry token ids, rank 0 embeds and
    one all-reduce shares the step tensor, rank 0's head returns the argmax (+ logits on demand)."""
    llm = tpserve.load(PATH, tp=2, backend="ray", dtype=torch.float32, allreduce=requested,
                       head_at="rank0")
    ref = tpserve.load(PATH, tp=2, dtype=torch.float32)
    try:
        assert llm.head is None  # one copy of the head: rank 0's
        assert llm.executor.head_bytes > 0 and llm.lm_head == ref.lm_head == "dense"
        assert torch.equal(llm.logits(IDS), local2)  # embedding + zeros summed: exact
        n = llm.cfg.num_layers
        assert llm.executor.stats.allreduce_count == 2 * n + 1
        # greedy rows need only the argmax; sampled rows get the logits
        plan = StepPlan([1], [0], [len(IDS)], out_rows=[len(IDS) - 1])
        logits, argmax = llm.step(torch.tensor(IDS), plan, need_logits=False)
        assert logits is None and argmax.tolist() == [int(local2[-1].argmax())]
        for kw in ({}, {"temperature": 0.8, "seed": 7, "logprobs": 2}, {"prompt_logprobs": 1}):
            assert llm.generate(IDS, max_tokens=6, ignore_eos=True, **kw) == \
                ref.generate(IDS, max_tokens=6, ignore_eos=True, **kw)
    finally:
        llm.close()


def test_auto_puts_the_head_on_rank0_for_cpu_ranks_and_coordinator_keeps_it(ray_cluster, caplog):
    """CPU ranks on the driver's host: `auto` places the head on rank 0 (its bursts measured as
    fast or faster, bench/README.md) and says so; `coordinator` keeps it at the coordinator."""
    with caplog.at_level(logging.INFO, logger="tpserve.runtime.ray_executor"):
        llm = tpserve.load(PATH, tp=2, backend="ray", dtype=torch.float32)
    try:
        assert llm.head is None and llm.executor.head_bytes > 0
        assert any("is on rank 0" in r.getMessage() for r in caplog.records)
    finally:
        llm.close()
    llm = tpserve.load(PATH, tp=2, backend="ray", dtype=torch.float32, head_at="coordinator")
    try:
        assert llm.head is not None and llm.executor.head_bytes == 0
    finally:
        llm.close()
    with pytest.raises(tpserve.TpserveError, match="head_at='gpu' is not known"):
        tpserve.load(PATH, tp=2, backend="ray", dtype=torch.float32, head_at="gpu")


def test_tpserve_profile_writes_each_ranks_window(ray_cluster, tmp_path, monkeypatch):
    """TPSERVE_PROFILE=FIRST:COUNT:DIR reaches every rank and profiles that window of its steps."""
    import json
    monkeypatch.setenv("TPSERVE_PROFILE", f"2:3:{tmp_path}")
    llm = tpserve.load(PATH, tp=2, backend="ray", dtype=torch.float32)
    try:
        llm.generate(IDS, max_tokens=8, ignore_eos=True)  # 1 prefill + 7 decode steps
    finally:
        llm.close()
    for r in range(2):
        table = (tmp_path / f"rank{r}.txt").read_text()
        assert table.startswith(f"rank {r}, steps 2..4 (3 steps)")
        assert "aten::" in table  # the ops the rank ran inside the window
        assert json.loads((tmp_path / f"rank{r}.trace.json").read_text())["traceEvents"]
    monkeypatch.setenv("TPSERVE_PROFILE", "40:8")
    with pytest.raises(tpserve.TpserveError, match="TPSERVE_PROFILE='40:8' is not FIRST:COUNT:DIR"):
        tpserve.load(PATH, tp=2, backend="ray", dtype=torch.float32)
