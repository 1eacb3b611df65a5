"""The Evaluate / Export tab runs the CLI itself: its result, or its one-line error, is what the page shows."""

from __future__ import annotations

import json
import math

from rlhf_time.data.quickstart import EVAL_FILE
from rlhf_time.webui import tasks


def test_eval_prints_the_metrics_and_export_of_a_full_model_is_the_clis_one_line_error(run_folders, tmp_path):
    final = run_folders["finished"][0] / "final"
    result = tasks.evaluate(tmp_path / "work", "sft", str(final), str(EVAL_FILE), max_seq_length=64)
    assert result.exit_code == 0 and result.error is None, result.stderr[-2000:]
    metrics = json.loads(result.stdout)
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] > 0
    assert result.shown().startswith(f"$ rlhf-time eval {tmp_path / 'work' / 'eval.yaml'}\n{{")

    exported = tasks.export(str(final), str(tmp_path / "merged"), dtype="float32")
    assert exported.exit_code == 2 and exported.error.startswith("error: ") and "adapter" in exported.error
    assert exported.shown() == f"$ rlhf-time export {final} {tmp_path / 'merged'} --dtype float32\n{exported.error}"
    assert not (tmp_path / "merged").exists()
