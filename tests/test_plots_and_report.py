"""Charts and report.md: the PNGs are valid images of the curves in metrics.jsonl; report.md links them and holds
the final/best metrics and the before/after sample generations; `rlhf-time plot` compares runs."""

import json
import re
import struct

import pytest

from rlhf_time import RewardTrainer, SFTrainer
from rlhf_time.cli import main
from rlhf_time.plots import chart_data

from .trainer.helpers import tiny_config


def _png_size(path):
    """(width, height) from a PNG's IHDR chunk, after checking the signature (the format, read by hand)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def _series(metrics_path, key):
    steps, values = [], []
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line)
        if key in row:
            steps.append(row["step"])
            values.append(row[key])
    return steps, values


def test_training_writes_charts_and_a_report(tmp_path, tiny_model_dir):
    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, max_steps=6, logging_steps=2, eval_strategy="steps",
                                    eval_steps=3, plot_metrics=True, report_samples=2, learning_rate=3e-3))
    results = trainer.train()
    run_dir, metrics = trainer.run_dir, trainer.run_dir / "metrics.jsonl"
    charts = {path.stem: path for path in (run_dir / "plots").glob("*.png")}
    assert {"loss", "learning_rate", "grad_norm", "throughput", "perplexity", "token_accuracy"} <= set(charts)
    for path in charts.values():
        width, height = _png_size(path)
        assert width >= 300 and height >= 200

    # The charts draw exactly the logged curves.
    data = chart_data({"run": [json.loads(line) for line in metrics.read_text().splitlines()]})
    assert data["loss"]["train"] == _series(metrics, "train/loss") and _series(metrics, "train/loss")[0] == [2, 4, 6]
    assert data["loss"]["eval"] == _series(metrics, "eval/loss") and _series(metrics, "eval/loss")[0] == [3, 6]
    assert data["learning_rate"]["train"] == _series(metrics, "train/lr")
    assert data["token_accuracy"]["eval"] == _series(metrics, "eval/token_accuracy")

    report = (run_dir / "report.md").read_text(encoding="utf-8")
    for name in charts:
        assert f"(plots/{name}.png)" in report
    final_eval = _series(metrics, "eval/loss")[1][-1]
    best_eval = min(_series(metrics, "eval/loss")[1])
    assert re.search(rf"\| eval/loss \| {final_eval:.4f} \| {best_eval:.4f} \(\d+\) \|", report)
    assert f"| global_step | {results['global_step']} |" in report
    assert "48 examples from 48 records" in report  # the data summary
    # Sample generations: the first two eval prompts with their references and answers before/after.
    eval_rows = [json.loads(line) for line in open(trainer.config.eval_file, encoding="utf-8")][:2]
    table = report.split("## Sample generations")[1].split("## Config")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "prompt" not in line]
    assert len(rows) == 2
    for row, record in zip(rows, eval_rows):
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        assert cells[:2] == [record["prompt"], record["response"]]
        assert cells[3] == trainer.predict([record["prompt"]])[0]  # greedy, config.max_new_tokens (8 < 64)
    assert "learning_rate | 0.003" in report and "```yaml" in report


def test_reward_model_report_has_accuracy_and_margin_charts_and_no_samples(tmp_path, tiny_model_dir):
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "examples" / "data"
    trainer = RewardTrainer(tiny_config(tmp_path, tiny_model_dir, stage="rm", max_steps=2, eval_strategy="steps",
                                        eval_steps=2, logging_steps=1, plot_metrics=True, max_train_samples=16,
                                        train_file=str(examples / "preference_train.jsonl"),
                                        eval_file=str(examples / "preference_eval.jsonl")))
    trainer.train()
    charts = {path.stem for path in (trainer.run_dir / "plots").glob("*.png")}
    assert {"loss", "accuracy", "margin"} <= charts
    report = (trainer.run_dir / "report.md").read_text(encoding="utf-8")
    assert "| eval/accuracy |" in report and "Sample generations" not in report


def _fake_run(folder, losses, eval_losses):
    folder.mkdir(parents=True)
    rows = [{"step": step, "train/loss": loss, "train/lr": 0.1} for step, loss in losses.items()]
    rows += [{"step": step, "eval/loss": loss, "eval/accuracy": 0.5} for step, loss in eval_losses.items()]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_plot_command_compares_runs(tmp_path, capsys):
    a = _fake_run(tmp_path / "a" / "lr_high", {1: 2.0, 2: 1.5, 3: 1.0}, {3: 1.2})
    b = _fake_run(tmp_path / "b" / "lr_low", {1: 2.0, 2: 1.8, 3: 1.7}, {3: 1.9})
    assert main(["plot", str(a), str(b), "--output", str(tmp_path / "compare")]) == 0
    written = capsys.readouterr().out.split()
    assert sorted(p.rsplit("/", 1)[1] for p in written) == ["accuracy.png", "learning_rate.png", "loss.png"]
    for path in (tmp_path / "compare").glob("*.png"):
        _png_size(path)
    data = chart_data({"lr_high": [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()],
                       "lr_low": [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]})
    assert data["loss"]["lr_high train"] == ([1, 2, 3], [2.0, 1.5, 1.0])
    assert data["loss"]["lr_low eval"] == ([3], [1.9])
    # One run: charts go into its own plots/ folder.
    assert main(["plot", str(a)]) == 0
    assert (a / "plots" / "loss.png").is_file()


def test_plot_command_on_a_folder_without_metrics_is_one_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "metrics.jsonl" in err and "Traceback" not in err


def test_a_step_logged_twice_is_drawn_once_with_its_last_value():
    data = chart_data({"r": [{"step": 1, "train/loss": 3.0}, {"step": 2, "train/loss": 2.0},
                             {"step": 2, "train/loss": 1.0}]})
    assert data["loss"]["train"] == ([1, 2], [3.0, 1.0])


@pytest.mark.parametrize("stage_metric", ["rewards/accuracies", "rewards/margins"])
def test_dpo_reward_metrics_get_their_own_chart(stage_metric):
    data = chart_data({"r": [{"step": 1, f"train/{stage_metric}": 0.5, f"eval/{stage_metric}": 0.7}]})
    assert data[stage_metric.replace("/", "_")] == {"train": ([1], [0.5]), "eval": ([1], [0.7])}
