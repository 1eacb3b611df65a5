"""Reward functions: built-ins, import strings, the checked call (clear one-line errors), the weighted sum,
and a reward-model folder as a reward."""

import pytest
import torch

from rlhf_time.config import TrainingConfig
from rlhf_time.experience.rewards import (RewardFunctionError, RewardModelReward, RewardScorer, call_reward_function,
                               load_reward_function, weighted_sum)


def test_builtins():
    _, exact = load_reward_function("exact_match")
    assert exact(["p"] * 4, ["四 零", " 四\n零\t", "四零", "x"], answer=["四 零", "四 零", "四 零", None]) == [
        1.0, 1.0, 0.0, None]
    _, regex = load_reward_function("regex_match")
    assert regex(["p"] * 3, ["<a>\nb</a>", "b", "zzz"], reward_regex=[r"^<a>.*</a>$", r"^<a>", None]) == [1.0, 0.0, None]
    name, penalty = load_reward_function("length_penalty", max_completion_length=8)
    assert name == "length_penalty"
    assert penalty(["p"] * 2, ["ab", ""], completion_ids=[[5, 6], []]) == [-2 / 8, 0.0]


def test_import_string(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def shorter(prompts, completions, **columns):\n    return [-len(c) for c in completions]\n"
        "NOT_A_FUNCTION = 3\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    name, fn = load_reward_function("my_rewards:shorter")
    assert name == "shorter" and fn(["p"], ["abc"]) == [-3]
    with pytest.raises(RewardFunctionError, match=r"'my_rewards:missing': module 'my_rewards' has no attribute 'missing'"):
        load_reward_function("my_rewards:missing")
    with pytest.raises(RewardFunctionError, match="'NOT_A_FUNCTION' is a int, not a function"):
        load_reward_function("my_rewards:NOT_A_FUNCTION")
    with pytest.raises(RewardFunctionError, match=r"cannot import 'no_such_module_xyz' \(ModuleNotFoundError"):
        load_reward_function("no_such_module_xyz:f")
    with pytest.raises(RewardFunctionError, match="unknown reward function 'exact'; built-ins: exact_match, regex_match, "
                                                   "length_penalty"):
        load_reward_function("exact")


def test_call_errors_name_the_function_and_the_value():
    def boom(prompts, completions, **_):
        raise KeyError("answer")

    with pytest.raises(RewardFunctionError, match=r"^reward function 'boom' raised KeyError: 'answer'$"):
        call_reward_function("boom", boom, ["p", "q"], ["a", "b"], {})
    with pytest.raises(RewardFunctionError, match=r"^reward function 'f' returned 1 values for 2 completions$"):
        call_reward_function("f", lambda p, c: [1.0], ["p", "q"], ["a", "b"], {})
    with pytest.raises(RewardFunctionError, match=r"returned 'high' \(str\) for completion 1; expected a finite number"):
        call_reward_function("f", lambda p, c: [1.0, "high"], ["p", "q"], ["a", "b"], {})
    with pytest.raises(RewardFunctionError, match=r"returned nan \(float\) for completion 0"):
        call_reward_function("f", lambda p, c: [float("nan"), 1], ["p", "q"], ["a", "b"], {})
    with pytest.raises(RewardFunctionError, match=r"returned a float; expected a list of 2 numbers"):
        call_reward_function("f", lambda p, c: 1.0, ["p", "q"], ["a", "b"], {})
    # numpy / torch outputs and ints are fine; columns arrive by name
    assert call_reward_function("f", lambda p, c, answer: torch.tensor([1, 2]), ["p", "q"], ["a", "b"],
                                {"answer": [None, None]}) == [1.0, 2.0]


def test_weighted_sum_ignores_none_and_the_scorer_uses_config_weights():
    assert weighted_sum([[1.0, None, 0.0], [0.5, 2.0, None]], [2.0, -1.0]) == [2.0 - 0.5, -2.0, 0.0]
    config = TrainingConfig(stage="grpo",
                            rollout={"reward_funcs": ["exact_match", "regex_match"], "reward_weights": [1.0, 0.5]})
    scorer = RewardScorer.from_config(config)
    totals, per_function = scorer(["p", "p"], ["a", "b"], {"answer": ["a", "a"], "reward_regex": ["b", None]})
    assert scorer.names == ["exact_match", "regex_match"]
    assert per_function == [[1.0, 0.0], [0.0, None]] and totals == [1.0, 0.0]
    with pytest.raises(RewardFunctionError, match="no reward: set rollout.reward_funcs"):
        RewardScorer.from_config(TrainingConfig())
    with pytest.raises(RewardFunctionError, match="reward_weights has 2 values for 1 rewards"):
        RewardScorer.from_config(config, reward_funcs=[lambda p, c, **_: [0.0] * len(c)])


def test_reward_model_folder_scores_as_its_own_forward(tmp_path, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tiny_tokenizer.pad_token_id
    folder = tmp_path / "rm"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    reward = RewardModelReward.from_folder(str(folder))
    prompts, completions = ["把数字写成中文：12", "hello"], ["一二", "hi there, a longer answer"]
    got = reward(prompts, completions)
    for prompt, completion, score in zip(prompts, completions, got):
        text = tiny_tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                                   {"role": "assistant", "content": completion}], tokenize=False)
        ids = tiny_tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = model.eval()(input_ids=ids).logits[0, 0].item()
        assert score == pytest.approx(expected, abs=1e-5)
    with pytest.raises(RewardFunctionError, match="not a model folder"):
        RewardModelReward.from_folder(str(tmp_path))
    with pytest.raises(RewardFunctionError, match="not a reward model"):
        RewardModelReward.from_folder(str(tiny_model_dir))
