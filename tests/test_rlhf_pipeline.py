"""examples/rlhf_pipeline: SFT -> RM -> PPO with the three YAML files exactly as the README runs them (`rlhf-time
train <file>` each, from one working directory); the PPO step raises the learned reward of sampled answers to
held-out prompts.

The working directory is the session's `user_folder` (tests/user_runs.py): the README's pipeline commands, which
tests/test_docs_blocks.py runs in full there (RUN_IN_FULL), are these runs, trained once."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from rlhf_time import InferenceModel

PIPELINE = Path(__file__).resolve().parents[1] / "examples" / "rlhf_pipeline"


def sampled_learned_reward(policy_folder: Path, reward_model: InferenceModel, prompts: list[str]) -> tuple[float, list[str]]:
    """Mean reward-model score of 4 sampled answers (temperature 0.7, fixed seed) to each prompt."""
    torch.manual_seed(0)
    repeated = [p for p in prompts for _ in range(4)]
    answers = InferenceModel.load(str(policy_folder)).predict(repeated, do_sample=True, temperature=0.7, top_k=0,
                                                              max_new_tokens=8)
    scores = reward_model.score(repeated, answers)
    return sum(scores) / len(scores), answers


def test_sft_rm_ppo_pipeline_raises_the_learned_reward(user_folder, monkeypatch, capsys):
    monkeypatch.chdir(user_folder.folder)  # the working directory of the runs (their configs hold relative paths)
    outputs = user_folder.folder / "outputs"  # each step's outputs/, where the next step's YAML looks for them
    for step in ("sft", "rm", "ppo"):
        run = user_folder.train([str(PIPELINE / f"{step}.yaml")])  # as shipped: report, charts, TensorBoard
        assert run.code == 0, (step, run.err[-3000:])
        assert run.unchanged(outputs / f"rlhf_{step}", user_folder.folder), f"outputs/rlhf_{step} was written again"
    rm_eval = [json.loads(line) for line in (outputs / "rlhf_rm" / "metrics.jsonl").read_text().splitlines()]
    assert [row for row in rm_eval if "eval/accuracy" in row][-1]["eval/accuracy"] >= 0.8  # the RM learned the task
    ppo_config = yaml.safe_load((outputs / "rlhf_ppo" / "final" / "rlhf_time_config.yaml").read_text())
    rollout = ppo_config["rollout"]
    assert Path(rollout["reward_model"]).resolve() == (outputs / "rlhf_rm" / "final").resolve()  # the learned reward
    assert rollout["reward_funcs"] == []  # and nothing hand-written

    records = [json.loads(line) for line in (PIPELINE.parent / "data" / "grpo_eval.jsonl").read_text().splitlines()]
    prompts = [r["prompt"] for r in records]
    reward_model = InferenceModel.load(str(outputs / "rlhf_rm" / "final"))
    before, sft_answers = sampled_learned_reward(outputs / "rlhf_sft" / "final", reward_model, prompts)
    after, ppo_answers = sampled_learned_reward(outputs / "rlhf_ppo" / "final", reward_model, prompts)
    truth = [r["answer"] for r in records for _ in range(4)]
    accuracy = lambda answers: sum(sum(a == b for a, b in zip(x, y)) / max(len(x), len(y), 1)  # noqa: E731
                                   for x, y in zip(answers, truth)) / len(truth)
    with capsys.disabled():
        print(f"\nRLHF pipeline: learned reward of sampled held-out answers {before:.3f} -> {after:.3f}; "
              f"digit accuracy (not the training signal) {accuracy(sft_answers):.3f} -> {accuracy(ppo_answers):.3f}")
    assert after > before + 0.3
