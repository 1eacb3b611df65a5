"""GRPO under 2-process gloo DDP (and FSDP): ranks stay identical, and with injected completions the update equals one
process's on the same global batch (2 ranks x 2 prompts = 1 process x 2 prompts x accumulation 2)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.grpo_helpers import InjectedGRPOTrainer
from tests.trainer.helpers import merged, tiny_config, train_losses

from .exit_probe import assert_no_gloo_thread_at_exit
from .settings import EXACT, WORLD_SIZE, turn_ending_model_dir

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def grpo_distributed_config(folder: Path, model_dir: Path, scenario: str, **overrides):
    """One rank's config: 2 prompts x G=4 per micro-batch, no accumulation, 2 steps."""
    values = dict(EXACT, stage="grpo", batch_size=2, grpo={"num_generations": 4},
                  rollout={"max_completion_length": 8, "reward_funcs": ["tests.trainer.grpo_helpers:char_share"]},
                  max_steps=2, max_train_samples=8, max_eval_samples=6, eval_batch_size=2, learning_rate=0.01,
                  save_strategy="no")
    if scenario == "injected_rpp":  # REINFORCE++: advantages whitened over both ranks' tokens, KL in the rewards
        values = merged(values, dict(grpo={"advantage_estimator": "reinforce_pp", "kl_coef": 0.1}))
    if scenario in ("sampled", "fsdp"):
        values = merged(values, dict(rollout={"reward_funcs": ["length_penalty"]}, grpo={"kl_coef": 0.1}))
    if scenario == "fsdp":  # every rank must run the same forwards: sampling runs to max_completion_length
        values.update(distributed="fsdp")
    if scenario == "environment":  # multi-turn episodes: each rank's episodes take their own number of turns
        guesses = str(EXAMPLES / "data" / "guess_train.jsonl")
        values = merged(values, dict(model_name=str(turn_ending_model_dir(model_dir)), train_file=guesses,
                                     eval_file=guesses, max_eval_samples=4,
                                     rollout={"environment": f"{EXAMPLES / 'guess_number.py'}:GuessTheNumber",
                                              "max_completion_length": 64, "max_tool_turns": 3,
                                              "reward_funcs": ["length_penalty"]}))
    return tiny_config(folder, model_dir, **merged(values, overrides))


@pytest.fixture(scope="module")
def launched(rl_launched) -> Path:
    """The scenarios injected, sampled and fsdp (grpo_worker.py), run by the launch shared with test_ppo_ddp.py."""
    return rl_launched / "grpo"


def test_ranks_stay_identical(launched):
    for scenario in ("injected", "injected_rpp", "sampled", "fsdp", "environment"):
        ranks = [json.loads((launched / scenario / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
        assert ranks[0]["digest"] == ranks[1]["digest"], scenario
        assert ranks[0]["eval"]["eval_reward"] == ranks[1]["eval"]["eval_reward"], scenario


@pytest.mark.parametrize("scenario", ["injected", "injected_rpp"])
def test_injected_completions_update_as_one_process(launched, tmp_path, tiny_model_dir, scenario):
    """injected_rpp: REINFORCE++'s whitening over the step gives 2 ranks the advantages of one process."""
    config = grpo_distributed_config(tmp_path, tiny_model_dir, scenario, gradient_accumulation_steps=WORLD_SIZE)
    single = InjectedGRPOTrainer(config)
    single.train()
    run_dir = launched / scenario / "outputs" / "run"
    assert train_losses(run_dir / "metrics.jsonl") == pytest.approx(train_losses(single.run_dir / "metrics.jsonl"),
                                                                    rel=1e-5, abs=1e-7)
    saved = load_file(run_dir / "final" / "model.safetensors")
    state = single.model.state_dict()
    changed = 0
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, state[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        changed += not torch.equal(tensor, load_file(Path(tiny_model_dir) / "model.safetensors")[name])
    assert changed  # the update did something


def test_no_gloo_thread_outlives_the_process_group(rl_launched):
    """A run that ends under FSDP still leaves no gloo thread for Python's shutdown (it would abort the rank)."""
    assert_no_gloo_thread_at_exit(rl_launched)


def test_multi_turn_episodes_of_different_lengths_on_each_rank_train_in_step(launched):
    """An environment's episodes end after different numbers of turns on each rank; DDP's update still runs in step
    (the ranks stay identical, above) and the run logged multi-turn episodes."""
    run_dir = launched / "environment" / "outputs" / "run"
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    turns = [m["train/turns"] for m in steps if "train/turns" in m]
    assert len(turns) == 2 and max(turns) > 1.5
    samples = [json.loads(line) for line in (run_dir / "completions.jsonl").open()]
    assert len({len(s["trajectory"]) for s in samples}) > 1  # episodes of different lengths
    assert any("train/rewards/GuessTheNumber" in m for m in steps)
