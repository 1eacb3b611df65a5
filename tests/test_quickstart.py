"""The README's first command: the embedded default visibly learns the bundled task."""


def test_quickstart_learns(quickstart_run):
    results = quickstart_run  # run_quickstart with output_dir in a temp folder, no progress bar, report_to=none
    assert results["exact_match_before"] == 0.0
    assert results["exact_match_after"] >= 0.5
    assert results["exact_match_after"] > results["exact_match_before"]
