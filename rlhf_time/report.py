"""report.md in the run folder: config, data, final/best metrics, charts, sample generations before/after training.

`RunReport.start(trainer)` runs before the first step (it generates the "before" answers); `finish(trainer,
results)` draws the charts and writes the report. Both run on the main rank only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from rlhf_time.errors import RlhfTimeError
from rlhf_time.plots import chart_data, chart_title, draw_charts, read_metrics

log = logging.getLogger("rlhf_time")
SAMPLE_MAX_NEW_TOKENS = 64  # enough to see the answer; an untrained model would otherwise babble for 512 tokens


TEXT_PROMPT_TOKENS = 32  # text data: the first tokens of a document are the prompt, the rest its reference


@dataclass
class ReportSample:
    """One row of report.md's sample table: what the model is given (`text`, already rendered), the prompt as the
    table shows it, and the reference answer (None: the data has none, e.g. prompt-only records without `answer`)."""

    text: str
    shown_prompt: str
    reference: Optional[str]


def sample_prompts(config, data_kind: str, inference, count: int) -> list[ReportSample]:
    """The first `count` records of the eval data (else the train data) as report samples, for every data kind:
    conversations (the reference is the last reply), preference pairs (the chosen reply), unpaired examples (a
    desirable completion; none for an undesirable one), prompt-only records (the
    `answer` field when there is one) and text (the first tokens are the prompt, the rest the reference)."""
    from rlhf_time.data.formats import detect_format, to_messages, to_preference, to_unpaired
    from rlhf_time.data.prompts import to_prompt_messages
    from rlhf_time.data.sources import eval_spec, record_chunks, train_spec
    from rlhf_time.data.text import text_of
    from rlhf_time.data.tool_calls import record_tools

    spec = eval_spec(config) or train_spec(config)
    _, chunks = record_chunks(spec.sources[0], config, spec.role, limit=count)
    records = next(chunks, [])[:count]
    samples = []
    for record in records:
        if config.data_format == "text":
            samples.append(_text_sample(text_of(record), inference.tokenizer))
            continue
        if data_kind == "prompt":
            messages, answer = to_prompt_messages(record), record.data.get("answer")
            reference = None if answer is None else str(answer)
        elif detect_format(record, config.data_format) == "preference":
            pair = to_preference(record)
            messages, reference = pair.prompt_messages, pair.chosen
        elif detect_format(record, config.data_format) == "unpaired":
            example = to_unpaired(record)
            messages, reference = example.prompt_messages, example.completion if example.desirable else None
        else:
            conversation = to_messages(record, detect_format(record, config.data_format))
            last = max(i for i, message in enumerate(conversation) if message["role"] == "assistant")
            messages, reference = conversation[:last], conversation[last]["content"]
        shown = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        prompt = inference.encoder.generation_prompt(messages, tools=record_tools(record) if config.list_tools else None)
        samples.append(ReportSample(prompt, shown, reference))
    return samples


def _text_sample(text: str, tokenizer) -> ReportSample:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    cut = max(1, min(TEXT_PROMPT_TOKENS, len(ids) // 2))  # a short document still keeps half as its reference
    # Byte-level tokens may split a character: move the cut back to where both halves decode cleanly.
    while cut > 1 and tokenizer.decode(ids[:cut]) + tokenizer.decode(ids[cut:]) != tokenizer.decode(ids):
        cut -= 1
    prompt = tokenizer.decode(ids[:cut])
    return ReportSample(prompt, prompt, tokenizer.decode(ids[cut:]))


class RunReport:
    """Collects what report.md needs over a run; call start() before training and finish() after."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled  # the main rank writes the report
        self.samples: list[tuple[list[dict[str, str]], str]] = []
        self.before: list[str] = []
        self.start_step = 0

    def start(self, trainer) -> "RunReport":
        """Generate the "before" answers; a failure is logged in one line and leaves the report without samples."""
        config = trainer.config
        self.start_step = trainer.global_step
        if not (self.enabled and config.plot_metrics and config.report_samples and trainer.model_head == "causal_lm"):
            return self
        if trainer.dist.enabled:  # generation on one rank would deadlock a sharded (FSDP) model
            log.info("report.md: sample generations are skipped under data parallelism")
            return self
        try:
            self.samples = sample_prompts(config, trainer.data_kind, trainer.inference, config.report_samples)
            self.before = self._generate(trainer)
        except Exception as error:  # the report is a by-product: it never stops a run
            log.warning(f"report.md: no sample generations ({_one_line(error)})")
            self.samples, self.before = [], []
        return self

    def finish(self, trainer, results: dict[str, Any]) -> Optional[Path]:
        """Draw the charts and write report.md; a failure is logged in one line and never fails the finished run."""
        if not (self.enabled and trainer.config.plot_metrics):
            return None
        try:
            return self._write(trainer, results)
        except Exception as error:
            log.warning(f"report.md not written ({_one_line(error)}); the trained model and metrics.jsonl are saved")
            return None

    def _write(self, trainer, results: dict[str, Any]) -> Path:
        config, run_dir = trainer.config, Path(trainer.run_dir)
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
        return trainer.inference.complete([sample.text for sample in self.samples], max_new_tokens=new_tokens,
                                          do_sample=False)


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


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
        with_reference = any(sample.reference is not None for sample in samples)
        header = ["prompt", *(["reference"] if with_reference else []), label, "after training"]
        lines += ["", "## Sample generations", "",
                  f"Greedy, at most {min(config.max_new_tokens, SAMPLE_MAX_NEW_TOKENS)} new tokens, on the first "
                  f"{len(samples)} records of `{config.eval_file or config.train_file}`.", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for sample, old, new in zip(samples, before, after):
            cells = [sample.shown_prompt, *([sample.reference or ""] if with_reference else []), old, new]
            lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    lines += ["", "## Config", "", "Fields that differ from the defaults:", "", "| field | value |", "|---|---|"]
    defaults = _flat(type(config).model_construct(stage=config.stage).to_dict())  # unvalidated: kd needs a teacher
    for key, value in _flat(config.to_dict()).items():
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


def _flat(values: dict[str, Any]) -> dict[str, Any]:
    """Config values with each option section's keys as `section.key`."""
    from rlhf_time.stages import SECTIONS

    flat = {}
    for key, value in values.items():
        if key in SECTIONS:  # not every mapping: `columns` is one field
            flat.update({f"{key}.{name}": item for name, item in value.items()})
        else:
            flat[key] = value
    return flat


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
