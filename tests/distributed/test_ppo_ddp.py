"""PPO under 2-process gloo DDP and FSDP2: the ranks sample different completions but stay identical (policy and
critic); after the first step FSDP holds DDP's weights (policy, critic, critic optimiser) to float rounding (later
steps sample from policies that differ by that rounding, so their completions may differ); an FSDP run resumed
from its checkpoint ends bit-identical to the uninterrupted one."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .exit_probe import assert_no_gloo_thread_at_exit
from .settings import WORLD_SIZE

SCENARIOS = ("ddp", "fsdp", "fsdp_resume")  # ppo_worker.py's, in rl_worker.py's order


@pytest.fixture(scope="module")
def launched(rl_launched) -> Path:
    """The PPO scenarios, run by the launch shared with test_grpo_ddp.py (rl_worker.py)."""
    return rl_launched / "ppo"


def _ranks(launched: Path, scenario: str) -> list[dict]:
    return [json.loads((launched / scenario / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


def test_ranks_stay_identical_under_ddp_and_fsdp(launched):
    for scenario in SCENARIOS:
        ranks = _ranks(launched, scenario)
        assert ranks[0] == ranks[1], scenario
    metrics = [json.loads(line) for line in (launched / "fsdp" / "outputs" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/value/loss" in row for row in metrics)


def test_fsdp_first_step_equals_ddp_for_policy_critic_and_critic_optimizer(launched, tiny_model_dir):
    first = {s: launched / s / "outputs" / "run" / "checkpoint-1" for s in ("ddp", "fsdp")}
    initial = load_file(Path(tiny_model_dir) / "model.safetensors")
    ddp, fsdp = (load_file(first[s] / "model.safetensors") for s in ("ddp", "fsdp"))
    assert any(not torch.equal(ddp[name], initial[name]) for name in ddp)  # the policy trained
    for name in ddp:
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    states = {s: torch.load(first[s] / "stage_state.pt", weights_only=True) for s in ("ddp", "fsdp")}
    critic_ddp, critic_fsdp = states["ddp"]["critic"], states["fsdp"]["critic"]
    assert critic_fsdp.keys() == critic_ddp.keys()  # full, unsharded tensors under the same names
    later = torch.load(launched / "ddp" / "outputs" / "run" / "checkpoint-2" / "stage_state.pt", weights_only=True)
    assert any(not torch.equal(later["critic"][name], critic_ddp[name]) for name in critic_ddp)  # the critic trains
    for name in critic_ddp:
        torch.testing.assert_close(critic_fsdp[name], critic_ddp[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    moments = {s: states[s]["critic_optimizer"]["optimizer"]["state"] for s in ("ddp", "fsdp")}
    assert moments["fsdp"].keys() == moments["ddp"].keys() and moments["ddp"]
    for name in moments["ddp"]:
        torch.testing.assert_close(moments["fsdp"][name]["exp_avg"], moments["ddp"][name]["exp_avg"], rtol=1e-3, atol=1e-6)


def test_fsdp_resume_is_exact(launched):
    assert _ranks(launched, "fsdp_resume")[0] == _ranks(launched, "fsdp")[0]


def test_no_gloo_thread_outlives_the_process_group(rl_launched):
    """A run that ends under FSDP still leaves no gloo thread for Python's shutdown (it would abort the rank)."""
    assert_no_gloo_thread_at_exit(rl_launched)
