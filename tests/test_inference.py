"""rlhf_time.inference: a trained folder loads once and predicts / chats / scores exactly as the trainer does,
without building a trainer; nothing in a model folder can switch on trust_remote_code."""

import json

import pytest
import yaml

from rlhf_time import InferenceModel, RewardTrainer, RlhfTimeError, SFTrainer
from rlhf_time.cli import main
from rlhf_time.runtime import loop

from .conftest import write_jsonl
from .trainer.helpers import tiny_config
from .trainer.test_reward import preference_files

PROMPTS = ["把数字写成中文：123", "把数字写成中文：907"]


@pytest.fixture(scope="module")
def templated_run(tmp_path_factory, tiny_model_dir):
    """A short SFT run with custom templates and a system prompt, so the layout is not the default one."""
    folder = tmp_path_factory.mktemp("templated")
    trainer = SFTrainer(tiny_config(folder, tiny_model_dir, max_steps=30, learning_rate=3e-3, use_lora=True,
                                    lora_target_modules=None, prompt_template="问：{prompt}\n",
                                    response_template="答：{response}", system_prompt="你是计算器。"))
    trainer.train()
    return trainer


def _no_trainer(monkeypatch):
    def refuse(self, config):
        raise AssertionError("inference built a trainer")

    monkeypatch.setattr(loop.Trainer, "__init__", refuse)


def test_a_trained_folder_predicts_as_the_trainer_does(templated_run, monkeypatch, tmp_path):
    expected = templated_run.predict(PROMPTS)
    conversation = [{"role": "user", "content": PROMPTS[0]}]
    expected_chat = templated_run.chat(conversation)
    _no_trainer(monkeypatch)
    model = InferenceModel.load(str(templated_run.run_dir / "final"))
    assert model.config.prompt_template == "问：{prompt}\n" and model.config.system_prompt == "你是计算器。"
    assert model.predict(PROMPTS) == expected
    assert model.chat(conversation) == expected_chat
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    output = tmp_path / "out.jsonl"
    assert main(["predict", str(templated_run.run_dir / "final"), "--input", str(prompts), "--output", str(output)]) == 0
    assert [json.loads(line)["prediction"] for line in output.read_text(encoding="utf-8").splitlines()] == expected


def test_a_model_folder_cannot_grant_itself_remote_code(tmp_path, tiny_model_dir):
    folder = tmp_path / "downloaded"
    folder.mkdir()
    for file in tiny_model_dir.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    (folder / "rlhf_time_config.yaml").write_text(yaml.safe_dump({"trust_remote_code": True, "max_new_tokens": 5}))
    model = InferenceModel.load(str(folder))
    assert model.config.trust_remote_code is False and model.config.max_new_tokens == 5
    assert InferenceModel.load(str(folder), ["trust_remote_code=true"]).config.trust_remote_code is True  # the user may


def test_score_uses_a_reward_model_and_refuses_a_causal_lm(tmp_path, tiny_model_dir, monkeypatch):
    trainer = RewardTrainer(tiny_config(tmp_path, tiny_model_dir, stage="rm", max_steps=2, **preference_files(tmp_path, 8, 4)))
    trainer.train()
    expected = trainer.score(["把数字写成中文：12"], ["一二"])
    _no_trainer(monkeypatch)
    scorer = InferenceModel.load(str(trainer.run_dir / "final"))
    assert scorer.score(["把数字写成中文：12"], ["一二"]) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(RlhfTimeError, match="predict/chat need a causal LM"):
        scorer.predict(["x"])
    with pytest.raises(RlhfTimeError, match="score needs a reward model"):
        InferenceModel.load(str(tiny_model_dir)).score(["p"], ["r"])
    source = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "把数字写成中文：12", "response": "一二"}])
    assert main(["score", str(trainer.run_dir / "final"), "--input", str(source), "--output", str(tmp_path / "s.jsonl")]) == 0
    assert json.loads((tmp_path / "s.jsonl").read_text())["reward"] == pytest.approx(expected[0], rel=1e-5)


def test_score_ranks_preference_pairs_and_reads_the_file_before_the_model(tmp_path, tiny_model_dir, monkeypatch):
    trainer = RewardTrainer(tiny_config(tmp_path, tiny_model_dir, stage="rm", max_steps=2, **preference_files(tmp_path, 8, 4)))
    trainer.train()
    final = str(trainer.run_dir / "final")
    pairs = [{"prompt": "把数字写成中文：12", "chosen": "一二", "rejected": "三四"},
             {"prompt": "把数字写成中文：5", "chosen": "五", "rejected": "六"}]
    source = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    expected = trainer.score([p["prompt"] for p in pairs for _ in (0, 1)], [p[k] for p in pairs for k in ("chosen", "rejected")])
    output = tmp_path / "scored.jsonl"
    assert main(["score", final, "--input", str(source), "--output", str(output)]) == 0
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    got = [value for row in rows for value in (row["chosen_reward"], row["rejected_reward"])]
    assert got == pytest.approx(expected, rel=1e-5) and rows[0]["chosen"] == "一二"
    bad = write_jsonl(tmp_path / "bad.jsonl", [pairs[0], {"prompt": "p", "chosen": "c"}])
    monkeypatch.setattr(InferenceModel, "load", classmethod(lambda cls, *a, **k: pytest.fail("model loaded first")))
    assert main(["score", final, "--input", str(bad), "--output", str(output)]) == 2  # line 2: missing 'rejected'


def test_a_checkpoint_folder_predicts_in_the_layout_it_was_trained_in(tmp_path, tiny_model_dir):
    """checkpoint-N holds the run's config.yaml (no rlhf_time_config.yaml): its layout is read from there."""
    folder = tmp_path / "run" / "checkpoint-100"
    folder.mkdir(parents=True)
    for file in tiny_model_dir.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 100}))
    (folder / "config.yaml").write_text(yaml.safe_dump({"model_name": "tiny", "prompt_template": "问：{prompt}\n",
                                                        "list_tools": False, "trust_remote_code": True}))
    model = InferenceModel.load(str(folder))
    assert model.config.prompt_template == "问：{prompt}\n" and model.config.list_tools is False
    assert model.config.trust_remote_code is False
    assert model.encoder.generation_prompt([{"role": "user", "content": "12"}]).endswith("问：12\n")
