import os
import sys
from pathlib import Path

import pytest
import torch

# Triton decides at decoration time (a kernel module's import) whether @triton.jit kernels run in
# its CPU interpreter. Without a GPU, set it for the whole session, before any test module imports
# tpserve: otherwise a kernel module imported early (through tpserve) is decorated for a GPU and its
# kernel tests fail, depending on test order. The model's CPU path never runs kernels either way.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py: checkpoint builder + reference

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    """make(name, **kwargs) -> a tiny GPTQ checkpoint folder, built once per session."""
    import tiny
    made = {}

    def make(name, **kwargs):
        if name not in made:
            made[name] = tiny.make_checkpoint(tmp_path_factory.mktemp(name), **kwargs)
        return made[name]
    return make


@pytest.fixture(scope="session")
def ray_cluster():
    """One private Ray cluster for the whole test session (ray.init costs ~5 s and ~0.7 GiB)."""
    import ray
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory):
    """The embedded demo checkpoint, built into a test-private cache."""
    import os
    cache = tmp_path_factory.mktemp("tpserve-cache")
    os.environ["TPSERVE_CACHE"] = str(cache)
    from tpserve import demo
    return demo.demo_path()


SMALL = FIXTURES / "llama_g128_sym"  # the GPTQModel fixture the head-on-rank-0 tests run


@pytest.fixture(scope="module")
def ranks(ray_cluster):
    """SMALL over real Ray ranks at tp=2 with the head on rank 0: steps of token ids."""
    import tpserve
    llm = tpserve.load(SMALL, tp=2, backend="ray", dtype=torch.float32, head_at="rank0",
                       max_model_len=40, num_slots=4)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def single():
    """SMALL on the in-process ranks at tp=2, one step at a time: the tokens to match."""
    import tpserve
    llm = tpserve.load(SMALL, tp=2, dtype=torch.float32, max_model_len=40, num_slots=4)
    yield llm
    llm.close()
