"""Fixtures shared by the distributed tests."""

from pathlib import Path

import pytest

from .settings import failure_report


@pytest.fixture(scope="session")
def rl_launched(tmp_path_factory, tiny_model_dir) -> Path:
    """One torchrun launch of rl_worker.py: GRPO's scenarios in OUT/grpo/, PPO's in OUT/ppo/, exit probe in OUT."""
    from .test_data_parallel import torchrun

    out = tmp_path_factory.mktemp("torchrun-rl")
    result = torchrun(str(Path(__file__).with_name("rl_worker.py")), str(tiny_model_dir), str(out), timeout=880)
    assert result.returncode == 0, failure_report(result)
    return out
