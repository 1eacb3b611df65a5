"""Run listing and state from real run folders (a finished run, one stopped by SIGTERM, a held lock, a failure)."""

from __future__ import annotations

import json
import shutil

from rlhf_time.runtime.run_folder import LOCK_FILE, run_folder_lock
from rlhf_time.webui.runs import (LOG_FILE, chart_groups, draw_run_charts, list_runs, lock_is_held, log_tail, progress,
                                  report_markdown, run_state)


def test_finished_and_interrupted_runs_are_listed_with_stage_model_steps_and_best_metric(run_folders, tiny_model_dir):
    (finished, results), stopped = run_folders["finished"], run_folders["interrupted"]
    runs = {info.name: info for info in list_runs(run_folders["output_dir"])}
    assert set(runs) == {"finished", "stopped"} and runs["finished"].path == finished
    assert runs["finished"].state == "finished" and runs["stopped"].state == "interrupted"
    assert runs["finished"].step == results["global_step"] == 4
    assert runs["stopped"].step == 3
    assert (runs["finished"].stage, runs["finished"].model) == ("sft", str(tiny_model_dir))
    assert runs["finished"].best_metric == f"eval_loss {results['best_metric']:.4g}"
    assert runs["finished"].row()[0] == "finished" and runs["finished"].row()[-1] == "finished"
    assert sorted(path.name for path in stopped.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]

def test_a_held_lock_reads_running_and_a_failed_run_reads_failed(run_folders, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(run_folders["interrupted"], run_dir)
    assert not lock_is_held(run_dir / LOCK_FILE)
    with run_folder_lock(run_dir):  # the training loop's own lock
        assert lock_is_held(run_dir / LOCK_FILE)
        assert run_state(run_dir) == "running"
    assert not lock_is_held(run_dir / LOCK_FILE) and run_state(run_dir) == "interrupted"
    (run_dir / LOG_FILE).write_text("Traceback ...\nRuntimeError: boom\n\nexit code: 1\n", encoding="utf-8")
    assert run_state(run_dir) == "failed"  # a crash after a checkpoint is no clean stop
    only_config = tmp_path / "outputs" / "never_started"
    only_config.mkdir(parents=True)
    (only_config / "config.yaml").write_text("stage: dpo\nmodel_name: tiny\n", encoding="utf-8")
    (listed,) = list_runs(tmp_path / "outputs")
    assert (listed.name, listed.stage, listed.state, listed.step, listed.best_metric) == ("never_started", "dpo",
                                                                                          "failed", 0, "")


def test_progress_log_tail_charts_and_report(run_folders, tmp_path):
    finished, _ = run_folders["finished"]
    assert progress(finished) == (4, 4)
    rows = [json.loads(line) for line in (finished / "metrics.jsonl").read_text().splitlines()]
    groups = chart_groups(finished)
    steps, losses = groups["loss"]["loss"]["train"]
    assert list(zip(steps, losses)) == [(row["step"], row["train/loss"]) for row in rows if "train/loss" in row]
    assert groups["loss"]["loss"]["eval"][1] == [row["eval/loss"] for row in rows if "eval/loss" in row]
    assert groups["reward"] == {} and {"perplexity", "token_accuracy"} <= set(groups["eval"])
    assert all(list(series) == ["eval"] for series in groups["eval"].values())
    drawn = draw_run_charts(finished, tmp_path / "charts")
    assert [path.name for path in drawn["loss"]] == ["loss.png"] and drawn["reward"] == []
    assert sorted(path.stem for path in drawn["eval"]) == sorted(groups["eval"])
    assert all(path.read_bytes().startswith(b"\x89PNG") for paths in drawn.values() for path in paths)

    markdown = report_markdown(finished, lambda path: f"/file={path}")
    images = [line for line in markdown.splitlines() if line.startswith("![")]
    assert images and all(f"(/file={finished.resolve() / 'plots'}/" in line for line in images)
    assert all((finished / "plots" / line.rsplit("/", 1)[1].rstrip(")")).is_file() for line in images)

    (tmp_path / LOG_FILE).write_text("start\ntrain: 1/4\rtrain: 2/4\rtrain: 4/4\r\n\x1b[A\n\nexit code: 0\n",
                                     encoding="utf-8")
    assert log_tail(tmp_path, 2) == "train: 4/4\nexit code: 0"
    assert log_tail(tmp_path) == "start\ntrain: 4/4\nexit code: 0"
