"""The web UI in a real browser: `rlhf-time webui` as a child process, driven by Playwright in /usr/bin/chromium.

One SFT run of the embedded tiny model on the quickstart data from the Train tab (status, loss chart), a config
error that starts nothing, Stop turning a longer run into a checkpoint, the Runs tab (state, report, overlaid
curves), the Chat tab on the trained model, and both languages. Screenshots of every tab go to the test's tmp
folder (and to RLHF_TIME_WEBUI_SCREENSHOTS, when set, for the docs).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_time.data.quickstart import EVAL_FILE, TRAIN_FILE

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

if not CHROMIUM.exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api", reason="no playwright (pip install playwright)")
pytest.importorskip("gradio", reason='no gradio (pip install -e ".[webui]")')
expect = playwright.expect
expect.set_options(timeout=60_000)  # loading a model or a checkpoint on 2 busy cores takes seconds


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("webui")
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "RLHF_TIME_CACHE": str(folder / "cache"), "PYTHONUNBUFFERED": "1"}
    log = open(folder / "server.log", "w", encoding="utf-8")
    process = subprocess.Popen([sys.executable, "-m", "rlhf_time", "webui", "--port", str(port), "--output-dir",
                                str(folder / "out")], cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while f"rlhf-time webui: {url}" not in (folder / "server.log").read_text(encoding="utf-8"):
        assert process.poll() is None and time.monotonic() < deadline, (folder / "server.log").read_text()
        time.sleep(0.3)
    try:
        yield {"url": url, "out": folder / "out", "shots": folder / "screenshots"}
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def page(server):
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(server["url"])
        expect(page.locator("#start")).to_be_visible()
        yield page
        browser.close()


def _box(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def _fill(page, elem_id: str, value: str) -> None:
    box = _box(page, elem_id)
    expect(box).to_be_editable()
    box.fill(value)
    box.press("Tab")  # blur: the value reaches the server with the next event
    expect(box).to_have_value(value)


def _shoot(page, server, name: str) -> None:
    server["shots"].mkdir(exist_ok=True)
    path = server["shots"] / f"{name}.png"
    page.screenshot(path=str(path), full_page=name.startswith("train"))
    docs = os.environ.get("RLHF_TIME_WEBUI_SCREENSHOTS")
    if docs:
        Path(docs).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(docs) / f"webui_{name}.png")


def _plot_has_points(page, elem_id: str) -> bool:
    """Whether the chart shows drawn curves: its image holds coloured pixels (axes, text and grid are grey)."""
    return page.locator(f"#{elem_id}").evaluate(
        """element => {
            const img = element.querySelector('img');
            if (!img || !img.complete || !img.naturalWidth) return false;
            const canvas = document.createElement('canvas');
            [canvas.width, canvas.height] = [img.naturalWidth, img.naturalHeight];
            const context = canvas.getContext('2d');
            context.drawImage(img, 0, 0);
            const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
            let coloured = 0;
            for (let i = 0; i < data.length; i += 4) {
                const channels = [data[i], data[i + 1], data[i + 2]];
                if (Math.max(...channels) - Math.min(...channels) > 80) coloured++;
            }
            return coloured > 100;
        }""")


def _wait_for_step(page, step: int, timeout: float = 120) -> None:
    """Until the Train tab's progress reads at least `step` optimiser steps."""
    deadline = time.monotonic() + timeout
    while int(re.match(r"\d*", _box(page, "progress").input_value())[0] or 0) < step:
        assert time.monotonic() < deadline, f"no step {step} in {timeout} s: {_box(page, 'progress').input_value()}"
        time.sleep(0.5)


def _start(page, name: str, max_steps: int) -> None:
    _fill(page, "experiment_name", name)
    _fill(page, "max_steps", str(max_steps))
    page.locator("#start").click()


def test_train_runs_chat_and_languages_in_chromium(server, page):
    out = server["out"]
    expect(_box(page, "status")).to_have_value("no run yet")
    assert not _plot_has_points(page, "loss_plot")  # the check below sees an empty chart as empty
    # A stage's own options appear with it (dpo: its section), and none for sft.
    for name in ("dpo", "sft"):
        _box(page, "stage").click()
        page.get_by_role("option", name=name, exact=True).click()
        if name == "dpo":
            expect(page.locator("#section-dpo")).to_be_visible()
        else:
            expect(page.locator("#stage_options")).to_be_hidden()
    _fill(page, "model_name", "tiny")
    _fill(page, "train_file", str(TRAIN_FILE))
    _fill(page, "eval_file", str(EVAL_FILE))
    _fill(page, "learning_rate", "2e-3")
    expect(_box(page, "detected_format")).to_have_value("prompt_response")

    # A config error: the CLI's one line beside the form, and no run folder.
    _fill(page, "batch_size", "0")
    _start(page, "webui_bad", 30)
    error = page.locator("#config_error")
    expect(_box(page, "config_error")).to_have_value(re.compile(r"^invalid config: batch_size: .*greater than 0"))
    assert not (out / "webui_bad").exists()
    expect(_box(page, "status")).to_have_value("no run yet")
    _fill(page, "batch_size", "8")

    # An SFT run from the form: finished, with its loss curve.
    _start(page, "webui_sft", 30)
    expect(error).to_be_hidden()
    expect(_box(page, "status")).to_have_value(re.compile("^(running|finished) · webui_sft"))
    expect(_box(page, "status")).to_have_value(re.compile("^finished"), timeout=240_000)
    expect(_box(page, "progress")).to_have_value("30 / 30")
    deadline = time.monotonic() + 20
    while not _plot_has_points(page, "loss_plot"):
        assert time.monotonic() < deadline, "the loss chart drew no points"
        time.sleep(0.5)
    assert (out / "webui_sft" / "final").is_dir() and (out / "webui_sft" / "report.md").is_file()
    _shoot(page, server, "train_en")

    # Stop: a long run stopped mid-way writes a checkpoint and reads interrupted (logged every 2 steps, to watch).
    page.locator("#common_options").get_by_text("Options of every stage").click()
    page.get_by_text("checkpoints, logging", exact=True).click()
    page.wait_for_timeout(500)  # the opened group's inputs mount with their defaults first
    _fill(page, "logging_steps", "2")
    page.locator("#common_options").get_by_text("Options of every stage").click()  # closed again: a shorter page
    _start(page, "webui_stop", 5000)
    expect(_box(page, "status")).to_have_value(re.compile("webui_stop"))
    shown_steps = 20 if os.environ.get("RLHF_TIME_WEBUI_SCREENSHOTS") else 4  # the docs' picture: a curve
    _wait_for_step(page, shown_steps)
    _shoot(page, server, "train_running")
    page.locator("#stop").click()
    expect(_box(page, "status")).to_have_value(re.compile("^interrupted"), timeout=120_000)
    assert list((out / "webui_stop").glob("checkpoint-*")) and not (out / "webui_stop" / "final").exists()

    # Runs tab: both runs with their state; the report with its charts; curves overlaid.
    page.locator("button[role=tab]", has_text="Runs").click()
    table = page.locator("#runs_table")
    expect(table).to_contain_text("webui_sft")
    expect(table).to_contain_text("finished")
    expect(table).to_contain_text("interrupted")
    _box(page, "report_run").click()
    page.get_by_role("option", name="webui_sft", exact=True).click()
    page.locator("#open_report").click()
    report = page.locator("#report")
    expect(report).to_contain_text("webui_sft")
    chart = report.locator("img").first
    expect(chart).to_be_visible()
    assert chart.evaluate("img => img.complete && img.naturalWidth > 0")
    page.locator("#compare_runs label", has_text="webui_sft").click()
    page.locator("#compare_runs label", has_text="webui_stop").click()
    page.locator("#compare_button").click()
    overlaid = page.locator("#compare_charts img").first
    expect(overlaid).to_be_visible()
    page.wait_for_function("() => [...document.querySelectorAll('#compare_charts img')].every(i => i.complete)")
    _shoot(page, server, "runs")

    # Chat with the trained model.
    page.locator("button[role=tab]", has_text="Chat").click()
    _fill(page, "chat_model", str(out / "webui_sft" / "final"))
    page.locator("#chat_load").click()
    expect(_box(page, "chat_status")).to_have_value(str(out / "webui_sft" / "final"))
    _fill(page, "chat_input", "把数字写成中文：12")
    page.locator("#chat_send").click()
    expect(page.locator("#chatbot")).to_contain_text("把数字写成中文：12")
    bot = page.locator("#chatbot .bot, #chatbot [data-testid=bot]").last
    expect(bot).not_to_have_text(re.compile(r"^\s*$"))
    _shoot(page, server, "chat")
    checkpoint = str(out / "webui_sft" / "checkpoint-30")  # a checkpoint loads as a model folder does
    _fill(page, "compare_model", checkpoint)
    page.locator("#compare_load").click()
    expect(_box(page, "compare_status")).to_have_value(checkpoint)
    _fill(page, "compare_input", "把数字写成中文：7")
    page.locator("#compare_send").click()
    for side in ("compare_first", "compare_second"):
        expect(page.locator(f"#{side}")).to_contain_text("把数字写成中文：7")
        expect(page.locator(f"#{side} .bot, #{side} [data-testid=bot]").last).not_to_have_text(re.compile(r"^\s*$"))

    page.locator("button[role=tab]", has_text="Evaluate / Export").click()
    _shoot(page, server, "tools")

    # Chinese: the labels change, the ids stay.
    page.locator("button[role=tab]", has_text="Train").click()
    page.locator("#lang label", has_text="中文").click()
    expect(page.locator("#start")).to_have_text("开始")
    expect(page.locator("button[role=tab]", has_text="训练")).to_be_visible()
    expect(_box(page, "status")).to_have_value(re.compile("^已中断 · webui_stop"))
    _shoot(page, server, "train_zh")
    page.locator("button[role=tab]", has_text="运行记录").click()
    expect(page.locator("#runs_table")).to_contain_text("已完成")
    expect(page.locator("#runs_table")).to_contain_text("最佳指标")
    page.locator("button[role=tab]", has_text="训练").click()
    page.locator("#lang label", has_text="English").click()
    expect(page.locator("#start")).to_have_text("Start")
