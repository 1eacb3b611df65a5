"""The README's first command: the embedded default visibly learns the bundled task."""

from rlhf_time.quickstart import run_quickstart


def test_quickstart_learns(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_TIME_CACHE", str(tmp_path / "cache"))
    results = run_quickstart([f"output_dir={tmp_path / 'out'}", "disable_progress_bar=true", "report_to=none"])
    assert results["exact_match_before"] == 0.0
    assert results["exact_match_after"] >= 0.5
    assert results["exact_match_after"] > results["exact_match_before"]
