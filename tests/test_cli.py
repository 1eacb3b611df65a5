"""The CLI: bad config or data -> one line on stderr, exit code 2, no traceback; and the subcommands end to end."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from rlhf_time.cli import main


def _config(tmp_path, model_dir, **values):
    base = dict(model_name=str(model_dir), output_dir=str(tmp_path / "out"), experiment_name="cli", batch_size=4,
                max_steps=2, report_to="none", disable_progress_bar=True, save_strategy="no", eval_strategy="no",
                max_seq_length=64, data_cache_dir=str(tmp_path / "cache"), plot_metrics=False)
    base.update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(base, allow_unicode=True), encoding="utf-8")
    return path


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


BAD_DATA = [
    ("missing.jsonl", None, ["missing.jsonl", "not found"]),
    ("broken.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n', ["broken.jsonl", "line 2"]),
    ("noresp.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": "a", "answer": "b"}\n', ["noresp.jsonl", "line 2", "response"]),
    ("empty.jsonl", "\n\n", ["empty.jsonl", "empty"]),
    ("nocol.csv", "prompt,answer\nhi,there\n", ["nocol.csv", "response", "answer"]),
    ("wrong.json", '{"data": [{"prompt": "a", "response": 3}]}', ["wrong.json", "record", "response"]),
]


@pytest.mark.parametrize("name, content, words", BAD_DATA)
def test_bad_data_gives_one_line_and_exit_2(tmp_path, tiny_model_dir, capsys, name, content, words):
    data = tmp_path / name
    if content is not None:
        _write(data, content)
    code = main(["train", str(_config(tmp_path, tiny_model_dir, train_file=str(data)))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    message = [line for line in err if line.startswith("error:")]
    assert len(message) == 1 and "Traceback" not in "\n".join(err)
    for word in words:
        assert word in message[0], (word, message[0])


@pytest.mark.parametrize("override, word", [("batch_size=0", "batch_size"), ("learning_rat=1", "learning_rat"),
                                             ("lr_scheduler_type=poly", "cosine")])
def test_bad_config_gives_one_line_and_exit_2(tmp_path, tiny_model_dir, capsys, override, word):
    code = main(["train", str(_config(tmp_path, tiny_model_dir, train_file="x.jsonl")), override])
    err = capsys.readouterr().err
    assert code == 2 and word in err and "Traceback" not in err


def test_console_script_has_no_traceback(tmp_path):
    missing = tmp_path / "nope.yaml"
    result = subprocess.run([sys.executable, "-m", "rlhf_time", "train", str(missing)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error:") and "Traceback" not in result.stderr


def test_help_for_each_command():
    for command in ("train", "eval", "predict", "chat", "export", "score"):
        result = subprocess.run([sys.executable, "-m", "rlhf_time", command, "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "usage:" in result.stdout


def test_train_predict_eval_export_end_to_end(tmp_path, tiny_model_dir, capsys):
    from rlhf_time.data.quickstart import EVAL_FILE, TRAIN_FILE

    config = _config(tmp_path, tiny_model_dir, train_file=str(TRAIN_FILE), eval_file=str(EVAL_FILE),
                     max_train_samples=16, max_eval_samples=8, use_lora=True, lora_target_modules=None,
                     learning_rate=1e-2)
    assert main(["train", str(config)]) == 0
    final = tmp_path / "out" / "cli" / "final"
    assert (final / "adapter_config.json").is_file() and (final / "rlhf_time_config.yaml").is_file()

    prompts = _write(tmp_path / "prompts.txt", "把数字写成中文：123\n你好\n")
    output = tmp_path / "preds.jsonl"
    assert main(["predict", str(final), "--input", str(prompts), "--output", str(output), "max_new_tokens=4"]) == 0
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == ["把数字写成中文：123", "你好"] and all("prediction" in r for r in rows)

    capsys.readouterr()
    assert main(["eval", str(config), f"model_name={final}"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["eval_loss"] > 0

    merged = tmp_path / "merged"
    assert main(["export", str(final), str(merged)]) == 0
    from peft import PeftModel

    ids = torch.tensor([[3, 10, 20, 30, 40]])
    adapter_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final).eval()
    standalone = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert not (merged / "adapter_config.json").exists()
    with torch.no_grad():
        torch.testing.assert_close(standalone(ids).logits, adapter_model(ids).logits, rtol=1e-4, atol=1e-5)


def test_chat_repl(tmp_path, tiny_model_dir, monkeypatch, capsys):
    answers = iter(["你好", "/reset", "hello", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert main(["chat", str(tiny_model_dir), "max_new_tokens=3"]) == 0
    assert capsys.readouterr().out.count("assistant>") == 2


def test_train_without_yaml_or_train_file_is_the_quickstart(monkeypatch):
    import rlhf_time.quickstart

    calls = []
    monkeypatch.setattr(rlhf_time.quickstart, "run_quickstart", lambda overrides: calls.append(overrides))
    assert main(["train", "max_steps=1"]) == 0
    assert calls == [["max_steps=1"]]


def test_train_with_train_file_and_no_yaml_is_an_ordinary_run(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """key=value with the user's own data: the library's defaults (not the demo's), no quickstart numbers, and an
    occupied run folder is refused as for a YAML run."""
    import rlhf_time.quickstart

    monkeypatch.setattr(rlhf_time.quickstart, "run_quickstart", lambda overrides: pytest.fail("ran the quickstart"))
    data = _write(tmp_path / "train.jsonl", "".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n"
                                                     for i in range(8)))
    argv = ["train", f"model_name={tiny_model_dir}", f"train_file={data}", f"output_dir={tmp_path / 'out'}",
            "max_steps=1", "batch_size=4", "max_seq_length=64", f"data_cache_dir={tmp_path / 'cache'}"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    results = json.loads(out[out.index("{"):])
    assert results["global_step"] == 1 and "exact match" not in out
    run_dir = tmp_path / "out" / "sft_experiment"  # the library's default experiment name, not "quickstart"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    assert saved["learning_rate"] == 2e-5 and saved["overwrite_output_dir"] is False
    assert (run_dir / "final" / "config.json").is_file()
    # Again into the same folder: refused in one line, and the first run's model is untouched.
    before = (run_dir / "final" / "model.safetensors").read_bytes()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "Traceback" not in err
    assert (run_dir / "final" / "model.safetensors").read_bytes() == before
