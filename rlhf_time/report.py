"""report.md in the run folder: config, data, final/best metrics, charts, sample generations before/after training.

`RunReport.start(trainer)` runs before the first step (it generates the "before" answers); `finish(trainer,
results)` draws the charts and writes the report. Both run on the main rank only.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional

import yaml

from rlhf_time.errors import RlhfTimeError
from rlhf_time.plots import chart_data, chart_title, draw_charts, read_metrics

log = logging.getLogger("rlhf_time")
SAMPLE_MAX_NEW_TOKENS = 64  # enough to see the answer; an untrained model would otherwise babble for 512 tokens


def sample_prompts(path: str, config, count: int) -> list[tuple[list[dict[str, str]], str]]:
    """(prompt messages, reference answer) of the first `count` records of a data file (SFT or preference)."""
    from rlhf_time.data.formats import detect_format, to_messages, to_preference
    from rlhf_time.data.readers import read_records

    records = read_records(path)[:count]
    samples = []
    for record in records:
        fmt = detect_format(record, config.data_format)
        if fmt == "preference":
            pair = to_preference(record)
            samples.append((pair.prompt_messages, pair.chosen))
        else:
            messages = to_messages(record, fmt)
            last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
            samples.append((messages[:last], messages[last]["content"]))
    return samples


class RunReport:
    """Collects what report.md needs over a run; call start() before training and finish() after."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled  # the main rank writes the report
        self.samples: list[tuple[list[dict[str, str]], str]] = []
        self.before: list[str] = []
        self.start_step = 0

    def start(self, trainer) -> "RunReport":
        config = trainer.config
        self.start_step = trainer.global_step
        if not (self.enabled and config.plot_metrics and config.report_samples and trainer.model_head == "causal_lm"):
            return self
        if trainer.dist.enabled:  # generation on one rank would deadlock a sharded (FSDP) model
            log.info("report.md: sample generations are skipped under data parallelism")
            return self
        self.samples = sample_prompts(config.eval_file or config.train_file, config, config.report_samples)
        self.before = self._generate(trainer)
        return self

    def finish(self, trainer, results: dict[str, Any]) -> Optional[Path]:
        config, run_dir = trainer.config, Path(trainer.run_dir)
        if not (self.enabled and config.plot_metrics):
            return None
        rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
        charts = chart_data({config.experiment_name: rows})
        try:
            paths = draw_charts(charts, run_dir / "plots")
        except RlhfTimeError as error:  # matplotlib missing: the report is still written, without charts
            log.info(f"no charts: {error}")
            paths = []
        after = self._generate(trainer) if self.samples else []
        text = render_report(config, trainer, results, rows, paths, self.samples, self.before, after, self.start_step)
        path = run_dir / "report.md"
        path.write_text(text, encoding="utf-8")
        log.info(f"report: {path} ({len(paths)} charts in {run_dir / 'plots'})")
        return path

    def _generate(self, trainer) -> list[str]:
        new_tokens = min(trainer.config.max_new_tokens, SAMPLE_MAX_NEW_TOKENS)
        return trainer.inference.generate([messages for messages, _ in self.samples], max_new_tokens=new_tokens,
                                          do_sample=False)


# ------------------------------------------------------------------------------------------------ rendering
def render_report(config, trainer, results: dict[str, Any], rows: list[dict], charts: list[Path],
                  samples: list, before: list[str], after: list[str], start_step: int) -> str:
    lines = [f"# Run report: {config.experiment_name}", "",
             f"Stage `{config.stage}`, model `{config.model_name}`, {_tuning(config)}; "
             f"{results.get('global_step')} optimiser steps in {results.get('train_runtime', 0.0):.1f} s.", ""]
    lines += ["## Data", ""]
    for name in ("train", "eval"):
        dataset = getattr(trainer, f"{name}_dataset", None)
        if dataset is not None:
            lines.append(f"- {name} (`{getattr(config, f'{name}_file')}`): {dataset.stats.summary()}")
    lines += ["", "## Results", "", "| metric | final | best (step) |", "|---|---|---|"]
    lines += _metric_rows(rows)
    lines += ["", "| run summary | value |", "|---|---|"]
    for key, value in results.items():
        if key != "final_model_dir" and value is not None:
            lines.append(f"| {key} | {_fmt(value)} |")
    if charts:
        lines += ["", "## Charts", ""]
        lines += [f"![{chart_title(path.stem)}](plots/{path.name})" for path in charts]
    if samples:
        label = "before training" if start_step == 0 else f"at step {start_step} (resumed)"
        lines += ["", "## Sample generations", "",
                  f"Greedy, at most {min(config.max_new_tokens, SAMPLE_MAX_NEW_TOKENS)} new tokens, on the first "
                  f"{len(samples)} records of `{config.eval_file or config.train_file}`.", "",
                  f"| prompt | reference | {label} | after training |", "|---|---|---|---|"]
        for (messages, reference), old, new in zip(samples, before, after):
            prompt = messages[-1]["content"] if messages else ""
            lines.append(f"| {_cell(prompt)} | {_cell(reference)} | {_cell(old)} | {_cell(new)} |")
    lines += ["", "## Config", "", "Fields that differ from the defaults:", "", "| field | value |", "|---|---|"]
    defaults = type(config)().to_dict() if _builds_default(config) else {}
    for key, value in config.to_dict().items():
        if defaults.get(key, object()) != value:
            lines.append(f"| {key} | {_cell(str(value))} |")
    lines += ["", "<details><summary>Resolved config (config.yaml)</summary>", "", "```yaml",
              yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True).rstrip(), "```", "</details>", ""]
    return "\n".join(lines)


def _metric_rows(rows: list[dict]) -> list[str]:
    """Final and best value of every eval metric (best = lowest for losses/perplexity, else highest)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("eval/") and key.removeprefix("eval/") not in ("runtime", "tokens"):
                series.setdefault(key, []).append((int(row["step"]), float(value)))
    out = []
    for key, points in series.items():
        lower = any(word in key for word in ("loss", "perplexity"))
        best_step, best = (min if lower else max)(points, key=lambda point: point[1])
        out.append(f"| {key} | {_fmt(points[-1][1])} | {_fmt(best)} ({best_step}) |")
    train = [(int(row["step"]), float(row["train/loss"])) for row in rows if "train/loss" in row]
    if train:
        out.append(f"| train/loss (last logged) | {_fmt(train[-1][1])} | {_fmt(min(v for _, v in train))} "
                   f"({min(train, key=lambda point: point[1])[0]}) |")
    return out


def _tuning(config) -> str:
    if config.use_lora:
        return f"LoRA r={config.lora_rank}"
    if config.freeze_layers:
        return f"frozen layers {config.freeze_layers}"
    return "full fine-tuning"


def _builds_default(config) -> bool:
    try:
        type(config)()
        return True
    except RlhfTimeError:
        return False


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value) or value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4f}"
        return f"{value:.3e}"
    return str(value)


def _cell(text: str) -> str:
    """Table-safe text: pipes escaped, newlines as <br>, long text cut."""
    text = text if len(text) <= 200 else text[:197] + "..."
    return text.replace("|", "\\|").replace("\n", "<br>")
