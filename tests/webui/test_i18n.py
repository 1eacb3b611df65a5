"""Both languages label everything, and the page's labels come from them (the browser test switches them)."""

from __future__ import annotations

import re

import pytest

from rlhf_time.webui.i18n import LANGUAGES, STRINGS

CJK = re.compile(r"[\u4e00-\u9fff]")


def test_both_languages_have_the_same_keys_and_no_empty_label():
    assert set(LANGUAGES.values()) == set(STRINGS) == {"en", "zh"}
    assert set(STRINGS["en"]) == set(STRINGS["zh"])
    assert all(value.strip() for table in STRINGS.values() for value in table.values())


def test_chinese_labels_are_chinese():
    # Names that read the same in both (Top-p) are the exception, not the rule.
    same = [key for key in STRINGS["en"] if STRINGS["en"][key] == STRINGS["zh"][key]]
    assert same == ["top_p"]
    assert all(CJK.search(value) for key, value in STRINGS["zh"].items() if key not in same)


def test_every_label_of_the_page_is_in_both_tables_and_switching_changes_them(tmp_path):
    pytest.importorskip("gradio", reason='no gradio (pip install -e ".[webui]")')
    from rlhf_time.webui.app import build_app

    labels = build_app(tmp_path).labels
    keys = {key for _, key, _ in labels.items}
    assert keys <= set(STRINGS["en"]) and {"tab_train", "tab_runs", "tab_chat", "tab_tools", "start", "stop"} <= keys
    english, chinese = labels.texts("en"), labels.texts("zh")
    assert english == [STRINGS["en"][key] for _, key, _ in labels.items]
    assert all(before != after for (_, key, _), before, after in zip(labels.items, english, chinese) if key != "top_p")
    assert len(labels.updates("zh")) == len(labels.items)
    elem_ids = {component.elem_id for component, _, _ in labels.items}
    assert {"stage", "model_name", "train_file", "eval_file", "max_steps"}.isdisjoint(elem_ids)  # config names stay
    assert {"start", "stop", "status", "loss_plot", "runs_table", "chat_model", "chat_load", "chat_input",
            "chat_send", "chatbot", "lang"} <= elem_ids
