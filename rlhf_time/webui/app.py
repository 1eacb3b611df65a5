"""The page: four tabs (Train, Runs, Chat, Evaluate / Export) and the language switch, wired to the plain functions
of the modules beside it (form, control, runs, chat, tasks). Element ids named in the issue are kept exactly:
stage, model_name, train_file, eval_file, max_steps, start, stop, status, loss_plot, runs_table, chat_model,
chat_load, chat_input, chat_send, chatbot, lang."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import gradio as gr
import pandas as pd

from rlhf_time.errors import RlhfTimeError
from rlhf_time.webui import runs as run_folders
from rlhf_time.webui.chat import ChatModel
from rlhf_time.webui.control import RunControl, resume_config, write_run_config
from rlhf_time.webui.form import PRIMARY_FIELDS, FormField, data_preview, form_fields, form_values, stage_sections
from rlhf_time.webui.i18n import LANGUAGES, text
from rlhf_time.webui import tasks

REFRESH_SECONDS = 1.0
LOG_LINES = 12  # as many as the log box shows


class Labels:
    """The components whose label (or text) follows the language switch: (component, key, how to update it)."""

    def __init__(self, lang: str):
        self.lang = lang
        self.items: list[tuple[Any, str, str]] = []

    def __call__(self, key: str) -> str:
        return text(self.lang, key)

    def add(self, component: Any, key: str, attribute: str = "label") -> Any:
        self.items.append((component, key, attribute))
        return component

    def texts(self, lang: str) -> list[str]:
        return [text(lang, key) for _, key, _ in self.items]

    def updates(self, lang: str) -> list[Any]:
        """One update per component: its label (or its text) in `lang`."""
        return [type(component)(**{attribute: shown}) for (component, _, attribute), shown
                in zip(self.items, self.texts(lang))]


def build_app(output_dir: str | Path, lang: str = "en") -> gr.Blocks:
    output_dir = Path(output_dir).resolve()
    control = RunControl()
    labels = Labels(lang)
    T = labels.__call__

    with gr.Blocks(title="rlhf_time") as app:
        app.run_control = control  # the server stops the page's runs when it shuts down
        app.labels = labels
        with gr.Row():
            labels.add(gr.Markdown(T("title")), "title", "value")
            language = labels.add(gr.Radio(list(LANGUAGES), value=_language_name(lang), label=T("lang"),
                                           elem_id="lang", scale=0, min_width=200), "lang")
        lang_state = gr.State(lang)
        with gr.Tabs():
            with labels.add(gr.Tab(T("tab_train"), elem_id="tab_train"), "tab_train"):
                train = _train_tab(labels, control, output_dir, lang_state)
            with labels.add(gr.Tab(T("tab_runs"), elem_id="tab_runs"), "tab_runs") as runs_tab:
                runs_view = _runs_tab(labels, control, output_dir, lang_state, train["current_run"])
            with labels.add(gr.Tab(T("tab_chat"), elem_id="tab_chat"), "tab_chat"):
                _chat_tab(labels)
            with labels.add(gr.Tab(T("tab_tools"), elem_id="tab_tools"), "tab_tools"):
                _tools_tab(labels, output_dir)
        runs_tab.select(runs_view["refresh"], inputs=[lang_state], outputs=runs_view["outputs"])

        # The run list is refilled in the new language (its headers and states); every other label is updated.
        relabelled = [index for index, (component, _, _) in enumerate(labels.items)
                      if all(component is not refilled for refilled in runs_view["outputs"])]

        def switch(name: str):
            new = LANGUAGES[name]
            updates = labels.updates(new)
            return [new, *(updates[index] for index in relabelled), *runs_view["refresh"](new)]

        language.change(switch, inputs=[language], outputs=[lang_state, *(labels.items[i][0] for i in relabelled),
                                                            *runs_view["outputs"]])
    return app


def _language_name(lang: str) -> str:
    return next(name for name, code in LANGUAGES.items() if code == lang)


def _one_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


# ---------------------------------------------------------------------------------------------- Train
def _field_input(field: FormField, value: Any = None) -> Any:
    shown = field.default_value if value is None else value
    common = dict(label=field.name, info=field.help, elem_id=field.elem_id)
    if field.kind == "checkbox":
        return gr.Checkbox(value=shown, **common)
    if field.kind == "choice":
        return gr.Dropdown(list(field.choices), value=shown, **common)
    return gr.Textbox(value=shown, lines=1, max_lines=1, **common)


def _train_tab(labels: Labels, control: RunControl, output_dir: Path, lang_state: gr.State) -> dict[str, Any]:
    T = labels.__call__
    fields = form_fields()
    start_values = {"output_dir": str(output_dir)}  # the page's --output-dir, where the Runs tab looks
    inputs: dict[str, Any] = {}
    labels.add(gr.Markdown(T("train_intro")), "train_intro", "value")
    by_name = {field.name: field for field in fields}
    with gr.Row():
        for name in PRIMARY_FIELDS[:5]:
            inputs[name] = _field_input(by_name[name], start_values.get(name))
    with gr.Row():
        for name in PRIMARY_FIELDS[5:]:
            inputs[name] = _field_input(by_name[name], start_values.get(name))
    with gr.Row():
        detected = labels.add(gr.Textbox(label=T("detected_format"), interactive=False, elem_id="detected_format",
                                         scale=1), "detected_format")
        preview = labels.add(gr.JSON(label=T("preview"), elem_id="data_preview", scale=3), "preview")
    groups: dict[str, list[FormField]] = {}
    for field in fields:
        if field.name not in PRIMARY_FIELDS:
            groups.setdefault(field.group, []).append(field)
    section_boxes = {}
    with labels.add(gr.Accordion(T("common_options"), open=False, elem_id="common_options"), "common_options"):
        for group, members in groups.items():
            if members[0].section:
                continue
            with gr.Accordion(group, open=False):
                for field in members:
                    inputs[field.name] = _field_input(field, start_values.get(field.name))
    with labels.add(gr.Accordion(T("stage_options"), open=True, elem_id="stage_options",
                                 visible=bool(stage_sections("sft"))), "stage_options") as stage_box:
        for group, members in groups.items():
            if not members[0].section:
                continue
            with gr.Accordion(group, open=False, visible=group in stage_sections("sft"),
                              elem_id=f"section-{group}") as box:
                section_boxes[group] = box
                for field in members:
                    inputs[field.name] = _field_input(field)
    with gr.Row():
        start = labels.add(gr.Button(T("start"), variant="primary", elem_id="start"), "start", "value")
        stop = labels.add(gr.Button(T("stop"), variant="stop", elem_id="stop"), "stop", "value")
    error = labels.add(gr.Textbox(label=T("config_error"), visible=False, interactive=False, elem_id="config_error"),
                       "config_error")
    with gr.Row():
        status = labels.add(gr.Textbox(label=T("status"), interactive=False, elem_id="status"), "status")
        progress = labels.add(gr.Textbox(label=T("progress"), interactive=False, elem_id="progress"), "progress")
    with gr.Row():
        loss_plot = labels.add(gr.Image(label=T("loss_plot"), elem_id="loss_plot", interactive=False, height=300,
                                        scale=1), "loss_plot")
        eval_plot = labels.add(gr.Gallery(label=T("eval_plot"), elem_id="eval_plot", columns=2, height=300, scale=2,
                                          object_fit="contain",
                                          visible=False), "eval_plot")
    reward_plot = labels.add(gr.Gallery(label=T("reward_plot"), elem_id="reward_plot", columns=3, height=300,
                                        object_fit="contain",
                                        visible=False), "reward_plot")
    log = labels.add(gr.Textbox(label=T("log"), lines=12, max_lines=12, interactive=False, elem_id="log",
                                autoscroll=True), "log")
    current_run = gr.State(None)  # the run folder the tab follows (str)
    ordered = [field for field in fields if field.name in inputs]
    components = [inputs[field.name] for field in ordered]

    def show_preview(path: str, data_format: str):
        if not path or not path.strip():
            return "", None
        try:
            records, fmt = data_preview(path.strip(), data_format or "auto")
        except (RlhfTimeError, OSError, ValueError) as problem:
            return _one_line(problem), None
        return fmt, records

    inputs["train_file"].change(show_preview, inputs=[inputs["train_file"], inputs["data_format"]],
                                outputs=[detected, preview])

    def show_sections(stage: str):
        return [gr.Accordion(visible=bool(stage_sections(stage))),
                *(gr.Accordion(visible=name in stage_sections(stage)) for name in section_boxes)]

    inputs["stage"].change(show_sections, inputs=[inputs["stage"]], outputs=[stage_box, *section_boxes.values()])

    def start_run(*values):
        try:
            config_path = write_run_config(form_values(ordered, list(values)))
            process = control.start(config_path)
        except (RlhfTimeError, OSError) as problem:
            return gr.Textbox(value=_one_line(problem), visible=True), gr.skip()
        return gr.Textbox(value="", visible=False), str(process.run_dir)

    start.click(start_run, inputs=components, outputs=[error, current_run])

    def stop_run(run: str | None, lang: str):
        stopped = run is not None and control.stop(Path(run))
        return gr.Textbox(value=text(lang, "stopping" if stopped else "not_running"), visible=not stopped) \
            if not stopped else gr.Textbox(value="", visible=False)

    stop.click(stop_run, inputs=[current_run, lang_state], outputs=[error])

    drawn = gr.State(None)  # what the charts show: (run, metrics.jsonl size); redrawn only when that changes

    def refresh(run: str | None, lang: str, shown: tuple | None):
        if not run:
            return text(lang, "no_run"), "", "", gr.skip(), gr.skip(), gr.skip(), None
        run_dir = Path(run)
        state = run_folders.run_state(run_dir, running=run_dir in control.alive())
        step, total = run_folders.progress(run_dir)
        metrics = run_dir / "metrics.jsonl"
        now = (run, metrics.stat().st_size if metrics.is_file() else 0)
        if now == shown:
            charts = [gr.skip()] * 3
        else:  # the charts `rlhf-time plot` draws, redrawn when metrics.jsonl grows
            drawn = run_folders.draw_run_charts(run_dir, output_dir / ".webui" / "charts" / run_dir.name)
            charts = [str(drawn["loss"][0]) if drawn["loss"] else None,
                      *(gr.Gallery([str(path) for path in drawn[group]], visible=bool(drawn[group]))
                        for group in ("eval", "reward"))]
        return (f"{text(lang, 'state_' + state)} · {run_dir.name}", f"{step} / {total or '?'}",
                run_folders.log_tail(run_dir, LOG_LINES), *charts, now)

    timer = gr.Timer(REFRESH_SECONDS)
    timer.tick(refresh, inputs=[current_run, lang_state, drawn],
               outputs=[status, progress, log, loss_plot, eval_plot, reward_plot, drawn], show_progress="hidden")
    return {"current_run": current_run}


# ---------------------------------------------------------------------------------------------- Runs
def _runs_tab(labels: Labels, control: RunControl, output_dir: Path, lang_state: gr.State,
              current_run: gr.State) -> dict[str, Any]:
    T = labels.__call__
    refresh_button = labels.add(gr.Button(T("refresh"), elem_id="runs_refresh"), "refresh", "value")
    table = gr.Dataframe(headers=_headers(labels.lang), value=[], interactive=False, elem_id="runs_table",
                         label=T("runs_table"))
    labels.add(table, "runs_table")
    with gr.Row():
        chosen = labels.add(gr.CheckboxGroup([], label=T("compare"), elem_id="compare_runs"), "compare")
        compare = labels.add(gr.Button(T("compare_button"), elem_id="compare_button"), "compare_button", "value")
    gallery = labels.add(gr.Gallery(label=T("charts"), columns=3, elem_id="compare_charts", height=320,
                                    object_fit="contain"), "charts")
    with gr.Row():
        run = labels.add(gr.Dropdown([], label=T("report_run"), elem_id="report_run"), "report_run")
        open_report = labels.add(gr.Button(T("open_report"), elem_id="open_report"), "open_report", "value")
        resume = labels.add(gr.Button(T("resume"), elem_id="resume"), "resume", "value")
    message = gr.Textbox(visible=False, interactive=False, elem_id="runs_message", show_label=False)
    report = gr.Markdown(elem_id="report")

    def refresh(lang: str):
        found = run_folders.list_runs(output_dir, control.alive())
        names = [info.name for info in found]
        table_value = pd.DataFrame([_translated_row(info, lang) for info in found], columns=_headers(lang))
        return (gr.Dataframe(table_value, label=text(lang, "runs_table")),
                gr.CheckboxGroup(choices=names, label=text(lang, "compare")),
                gr.Dropdown(choices=names, label=text(lang, "report_run")))

    refresh_button.click(refresh, inputs=[lang_state], outputs=[table, chosen, run])

    def overlay(names: list[str]):
        if not names:
            return []
        from rlhf_time.plots import plot_runs

        out = output_dir / ".webui" / "compare"
        for old in out.glob("*.png"):
            old.unlink()
        return [str(path) for path in plot_runs([output_dir / name for name in names], out)]

    compare.click(overlay, inputs=[chosen], outputs=[gallery])

    def show_report(name: str | None):
        if not name:
            return ""
        return run_folders.report_markdown(output_dir / name, lambda path: f"/gradio_api/file={path}")

    open_report.click(show_report, inputs=[run], outputs=[report])

    def resume_run(name: str | None):
        if not name:
            return gr.skip(), gr.skip()
        try:
            process = control.start(resume_config(output_dir / name))
        except (RlhfTimeError, OSError) as problem:
            return gr.Textbox(value=_one_line(problem), visible=True), gr.skip()
        return gr.Textbox(value="", visible=False), str(process.run_dir)

    resume.click(resume_run, inputs=[run], outputs=[message, current_run])
    return {"refresh": refresh, "outputs": [table, chosen, run]}


def _headers(lang: str) -> list[str]:
    return [text(lang, key) for key in ("col_run", "col_stage", "col_model", "col_steps", "col_best", "col_state")]


def _translated_row(info: run_folders.RunInfo, lang: str) -> list[Any]:
    row = info.row()
    row[-1] = text(lang, "state_" + info.state)
    return row


# ---------------------------------------------------------------------------------------------- Chat
def _chat_tab(labels: Labels) -> None:
    T = labels.__call__
    model = gr.State(None)
    second = gr.State(None)
    with gr.Row():
        source = labels.add(gr.Textbox(label=T("chat_model"), elem_id="chat_model", scale=3), "chat_model")
        trust = labels.add(gr.Checkbox(False, label=T("trust_remote_code"), elem_id="chat_trust"), "trust_remote_code")
        load = labels.add(gr.Button(T("chat_load"), elem_id="chat_load", scale=0), "chat_load", "value")
    loaded = labels.add(gr.Textbox(label=T("chat_status"), interactive=False, elem_id="chat_status"), "chat_status")
    with gr.Row():
        system = labels.add(gr.Textbox(label=T("system_prompt"), elem_id="chat_system", scale=3), "system_prompt")
        temperature = labels.add(gr.Slider(0.0, 2.0, value=0.0, step=0.05, label=T("temperature"),
                                           elem_id="chat_temperature"), "temperature")
        top_p = labels.add(gr.Slider(0.05, 1.0, value=1.0, step=0.05, label=T("top_p"), elem_id="chat_top_p"), "top_p")
        max_new = labels.add(gr.Slider(1, 2048, value=128, step=1, label=T("max_new_tokens"),
                                       elem_id="chat_max_new_tokens"), "max_new_tokens")
    chatbot = labels.add(gr.Chatbot(label=T("chatbot"), elem_id="chatbot", height=320), "chatbot")
    with gr.Row():
        message = labels.add(gr.Textbox(label=T("chat_input"), elem_id="chat_input", scale=4), "chat_input")
        send = labels.add(gr.Button(T("chat_send"), variant="primary", elem_id="chat_send", scale=0), "chat_send", "value")
        clear = labels.add(gr.Button(T("chat_clear"), elem_id="chat_clear", scale=0), "chat_clear", "value")
    settings = [system, temperature, top_p, max_new]

    def load_model(path: str, trust_code: bool):
        try:
            chat_model = ChatModel(path, trust_remote_code=trust_code)
        except (RlhfTimeError, OSError, ValueError) as problem:
            return None, f"error: {_one_line(problem)}"
        return chat_model, chat_model.source

    load.click(load_model, inputs=[source, trust], outputs=[model, loaded])

    def reply(chat_model: ChatModel | None, history: list, user: str, *setting):
        history = list(history or [])
        if chat_model is None or not user.strip():
            yield history, user
            return
        history.append({"role": "user", "content": user})
        conversation = [{"role": item["role"], "content": _content(item)} for item in history]
        history.append({"role": "assistant", "content": ""})
        for partial in _stream(chat_model, conversation, *setting):
            history[-1] = {"role": "assistant", "content": partial}
            yield history, ""

    for event in (send.click, message.submit):
        event(reply, inputs=[model, chatbot, message, *settings], outputs=[chatbot, message])
    clear.click(lambda: ([], ""), outputs=[chatbot, message])

    labels.add(gr.Markdown(T("compare_heading")), "compare_heading", "value")
    with gr.Row():
        second_source = labels.add(gr.Textbox(label=T("compare_model"), elem_id="compare_model", scale=3),
                                   "compare_model")
        second_load = labels.add(gr.Button(T("compare_load"), elem_id="compare_load", scale=0), "compare_load", "value")
    second_loaded = gr.Textbox(show_label=False, interactive=False, elem_id="compare_status")
    with gr.Row():
        first_box = labels.add(gr.Chatbot(label=T("compare_first"), elem_id="compare_first", height=240),
                               "compare_first")
        second_box = labels.add(gr.Chatbot(label=T("compare_second"), elem_id="compare_second", height=240),
                                "compare_second")
    with gr.Row():
        both_message = labels.add(gr.Textbox(label=T("chat_input"), elem_id="compare_input", scale=4), "chat_input")
        both_send = labels.add(gr.Button(T("compare_send"), elem_id="compare_send", scale=0), "compare_send", "value")
    second_load.click(load_model, inputs=[second_source, trust], outputs=[second, second_loaded])

    def both(first: ChatModel | None, other: ChatModel | None, user: str, *setting):
        if not user.strip():
            yield [], []
            return
        asked = [{"role": "user", "content": user}]
        answers = ["", ""]
        for index, chat_model in enumerate((first, other)):
            if chat_model is None:
                continue
            for partial in _stream(chat_model, asked, *setting):
                answers[index] = partial
                yield tuple([*asked, {"role": "assistant", "content": answer}] for answer in answers)
        yield tuple([*asked, {"role": "assistant", "content": answer}] for answer in answers)

    both_send.click(both, inputs=[model, second, both_message, *settings], outputs=[first_box, second_box])


def _content(item: dict) -> str:
    """A Chatbot message's text (Gradio may hand content back as a list of parts)."""
    content = item.get("content")
    if isinstance(content, list):
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return str(content or "")


def _stream(chat_model: ChatModel, conversation: list[dict[str, str]], system: str, temperature: float,
            top_p: float, max_new: float):
    try:
        yield from chat_model.stream(conversation, system_prompt=system or "", temperature=float(temperature),
                                     top_p=float(top_p), max_new_tokens=int(max_new))
    except RlhfTimeError as problem:
        yield f"error: {_one_line(problem)}"


# ---------------------------------------------------------------------------------------------- Evaluate / Export
def _tools_tab(labels: Labels, output_dir: Path) -> None:
    from rlhf_time.stages import STAGES

    T = labels.__call__

    def shown(run: Callable[..., tasks.CommandResult]) -> Callable[..., str]:
        def handler(*values):
            try:
                return run(*values).shown()
            except (OSError, ValueError) as problem:  # e.g. a timeout, or no Python to start
                return f"error: {_one_line(problem)}"
        return handler

    labels.add(gr.Markdown(T("eval_heading")), "eval_heading", "value")
    with gr.Row():
        eval_model = labels.add(gr.Textbox(label=T("eval_model"), elem_id="eval_model", scale=2), "eval_model")
        eval_stage = labels.add(gr.Dropdown(list(STAGES), value="sft", label=T("eval_stage"), elem_id="eval_stage"),
                                "eval_stage")
        eval_file = labels.add(gr.Textbox(label=T("eval_file"), elem_id="eval_data", scale=2), "eval_file")
        eval_button = labels.add(gr.Button(T("eval_run"), elem_id="eval_run", scale=0), "eval_run", "value")
    eval_result = labels.add(gr.Textbox(label=T("result"), lines=6, interactive=False, elem_id="eval_result"), "result")
    eval_button.click(shown(lambda model, stage, data: tasks.evaluate(output_dir / ".webui", stage, model, data)),
                      inputs=[eval_model, eval_stage, eval_file], outputs=[eval_result])

    labels.add(gr.Markdown(T("score_heading")), "score_heading", "value")
    with gr.Row():
        score_model = labels.add(gr.Textbox(label=T("score_model"), elem_id="score_model"), "score_model")
        score_input = labels.add(gr.Textbox(label=T("score_input"), elem_id="score_input"), "score_input")
        score_output = labels.add(gr.Textbox(label=T("score_output"), elem_id="score_output"), "score_output")
        score_button = labels.add(gr.Button(T("score_run"), elem_id="score_run", scale=0), "score_run", "value")
    score_result = labels.add(gr.Textbox(label=T("result"), lines=3, interactive=False, elem_id="score_result"), "result")
    score_button.click(shown(tasks.score), inputs=[score_model, score_input, score_output], outputs=[score_result])

    labels.add(gr.Markdown(T("export_heading")), "export_heading", "value")
    with gr.Row():
        adapter = labels.add(gr.Textbox(label=T("export_adapter"), elem_id="export_adapter"), "export_adapter")
        target = labels.add(gr.Textbox(label=T("export_output"), elem_id="export_output"), "export_output")
        dtype = labels.add(gr.Dropdown(["", "bfloat16", "float16", "float32"], value="", label=T("export_dtype"),
                                       elem_id="export_dtype"), "export_dtype")
        trust = labels.add(gr.Checkbox(False, label=T("trust_remote_code"), elem_id="export_trust"), "trust_remote_code")
        export_button = labels.add(gr.Button(T("export_run"), elem_id="export_run", scale=0), "export_run", "value")
    export_result = labels.add(gr.Textbox(label=T("result"), lines=3, interactive=False, elem_id="export_result"),
                               "result")
    export_button.click(shown(lambda a, o, d, t: tasks.export(a, o, d or None, t)),
                        inputs=[adapter, target, dtype, trust], outputs=[export_result])
