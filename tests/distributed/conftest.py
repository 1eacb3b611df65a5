"""Fixtures shared by the distributed tests."""

import json
from pathlib import Path

import pytest

from .settings import build_turn_ending_model, failure_report


@pytest.fixture(scope="session")
def rl_launched(tmp_path_factory, tiny_model_dir) -> Path:
    """One torchrun launch of rl_worker.py: GRPO's scenarios in OUT/grpo/, PPO's in OUT/ppo/, exit probe in OUT."""
    from .test_data_parallel import torchrun

    guesses = Path(__file__).resolve().parents[2] / "examples" / "data" / "guess_train.jsonl"
    build_turn_ending_model(tiny_model_dir, [json.loads(line)["prompt"] for line in guesses.open()][:4])
    out = tmp_path_factory.mktemp("torchrun-rl")
    result = torchrun(str(Path(__file__).with_name("rl_worker.py")), str(tiny_model_dir), str(out), timeout=880)
    assert result.returncode == 0, failure_report(result)
    return out
