"""Callbacks, TensorBoard and metrics.jsonl, predict/chat, and the original API as users write it."""

import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rlhf_time import SFTrainer, TrainerCallback

from .helpers import tiny_config


def test_callbacks_see_every_step_and_hooks_fire(tmp_path, tiny_model_dir):
    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, max_steps=5, eval_strategy="steps", eval_steps=2,
                                    save_strategy="steps", save_steps=5))
    steps, events = [], []

    class Recorder(TrainerCallback):
        def on_train_begin(self, t):
            events.append("begin")

        def on_evaluate(self, t, metrics):
            events.append(f"eval@{t.global_step}")

        def on_save(self, t, folder):
            events.append(f"save@{t.global_step}")

        def on_train_end(self, t, results):
            events.append("end")

    trainer.callbacks.append(lambda t: steps.append(t.global_step))
    trainer.callbacks.append(Recorder())
    trainer.train()
    assert steps == [1, 2, 3, 4, 5]
    assert events == ["begin", "eval@2", "eval@4", "eval@5", "save@5", "end"]


def test_tensorboard_and_metrics_jsonl_hold_the_scalars(tmp_path, tiny_model_dir):
    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, max_steps=4, logging_steps=2, report_to="tensorboard",
                                    eval_strategy="steps", eval_steps=4))
    trainer.train()
    events = EventAccumulator(str(trainer.run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/mfu", "eval/loss"):
        assert tag in tags, tag
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/loss" in row for row in rows)
    assert (trainer.run_dir / "config.yaml").is_file()


def test_predict_and_chat_return_text(tmp_path, tiny_model_dir):
    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, max_steps=1))
    answers = trainer.predict(["你好，请介绍一下你自己。", "hello"], max_new_tokens=5)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    reply = trainer.chat([{"role": "system", "content": "你是一个AI助手。"}, {"role": "user", "content": "你好"}])
    assert isinstance(reply, str)


def test_model_save_pretrained_is_a_standard_folder(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, max_steps=1))
    trainer.train()
    trainer.model.save_pretrained(tmp_path / "my_model")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "my_model") is not None
