import sys
from pathlib import Path

import pytest

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
