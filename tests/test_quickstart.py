"""The README's first command: the embedded default visibly learns the bundled task."""


def test_quickstart_learns(quickstart_run):
    results = quickstart_run  # run_quickstart with output_dir in a temp folder, no progress bar, report_to=none
    assert results["exact_match_before"] == 0.0
    assert results["exact_match_after"] >= 0.5
    assert results["exact_match_after"] > results["exact_match_before"]


def test_quickstart_names_only_folders_that_exist(quickstart_run):
    """save_strategy is no in the quickstart: the best evaluation's weights are final/, not a checkpoint-N that was
    never written."""
    from pathlib import Path

    best = quickstart_run["best_checkpoint"]
    assert best is None or Path(best).is_dir()
    report = (Path(quickstart_run["final_model_dir"]).parent / "report.md").read_text(encoding="utf-8")
    assert "checkpoint-" not in report.split("## Config")[0]
