"""Each all-reduce path under the real Ray executor: same logits as the in-process ranks."""

import logging

import pytest
import torch

import tpserve
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
    before = set(shm.SHM_DIR.glob(shm.PREFIX + "*"))
    with caplog.at_level(logging.INFO, logger="tpserve.runtime.ray_executor"):
        llm = tpserve.load(PATH, tp=2, backend="ray", dtype=torch.float32, allreduce=requested)
    try:
        assert llm.executor.coord.path == path
        chosen = [r.getMessage() for r in caplog.records if "all-reduce path" in r.getMessage()]
        assert chosen and chosen[0].startswith(f"all-reduce path {path} (--allreduce {requested})")
        # fp32 partials of two ranks: every path sums them exactly as the in-process ranks do
        assert torch.equal(llm.logits(IDS), local2)
        stats = llm.executor.stats
        assert stats.allreduce_count == 2 * llm.cfg.num_layers and stats.dropped_messages == 0
    finally:
        llm.close()
    assert set(shm.SHM_DIR.glob(shm.PREFIX + "*")) == before  # no segment left behind


def test_an_impossible_choice_fails_before_any_rank_starts(ray_cluster):
    with pytest.raises(tpserve.TpserveError, match="allreduce='nccl' needs device='cuda'"):
        tpserve.load(PATH, tp=2, backend="ray", dtype=torch.float32, allreduce="nccl")
