"""Readers: JSONL / JSON / CSV give the same records and the same tokenised examples; locations; prompts."""

import csv
import json

from rlhf_time import TrainingConfig
from rlhf_time.data import load_sft_dataset, read_prompts, read_records
from tests.conftest import write_jsonl

RECORDS = [{"prompt": "用户问题", "response": "模型回答", "system": ""},
           {"prompt": "a, \"quoted\" {x}", "response": "b\nc", "system": "你是一个AI助手。"},
           {"prompt": "第三", "response": "😀 emoji", "system": ""}]


def write_all(tmp_path, records):
    paths = [write_jsonl(tmp_path / "d.jsonl", records), tmp_path / "d.json", tmp_path / "l.json", tmp_path / "d.csv"]
    paths[1].write_text(json.dumps({"data": records}, ensure_ascii=False, indent=2), encoding="utf-8")
    paths[2].write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    with open(paths[3], "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return paths


def test_same_records_and_locations_in_every_file_format(tmp_path):
    jsonl, obj, top_list, table = write_all(tmp_path, RECORDS)
    for path in (jsonl, obj, top_list, table):
        assert [r.data for r in read_records(path)] == RECORDS
    assert [r.location for r in read_records(jsonl)] == [f"{jsonl} line {n}" for n in (1, 2, 3)]
    assert [r.location for r in read_records(obj)] == [f"{obj} record {n}" for n in (1, 2, 3)]
    assert [r.location for r in read_records(table)] == [f"{table} row {n}" for n in (2, 3, 4)]


def test_three_file_formats_give_identical_examples(tmp_path, tiny_tokenizer):
    paths = write_all(tmp_path, RECORDS)
    config = TrainingConfig()
    reference, *others = [list(load_sft_dataset(p, tiny_tokenizer, config)) for p in paths]
    assert len(reference) == 3 and all(other == reference for other in others)


def test_blank_jsonl_lines_are_skipped_but_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('\n{"prompt": "a", "response": "b"}\n   \n\n{"prompt": "c", "response": "d"}\n', encoding="utf-8")
    assert [r.location for r in read_records(path)] == [f"{path} line 2", f"{path} line 5"]


def test_utf8_bom_and_spaced_csv_header(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("prompt, response\n问,答\n".encode("utf-8-sig"))
    assert read_records(path)[0].data == {"prompt": "问", "response": "答"}


def test_read_prompts_from_every_kind_of_file(tmp_path):
    (tmp_path / "p.txt").write_text("一\n\n二 {braces}\n", encoding="utf-8")
    assert read_prompts(tmp_path / "p.txt") == ["一", "二 {braces}"]
    records = [{"prompt": "p"}, {"instruction": "i", "input": "x", "output": "o"}, {"instruction": "j", "input": ""},
               {"messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "a"},
                             {"role": "user", "content": "last"}]},
               {"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]},
               {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "chosen": "c"}]
    write_jsonl(tmp_path / "p.jsonl", records)
    assert read_prompts(tmp_path / "p.jsonl") == ["p", "i\n\nx", "j", "last", "h", "u"]
    (tmp_path / "p.csv").write_text("prompt,response\n你好,x\n", encoding="utf-8")
    assert read_prompts(tmp_path / "p.csv") == ["你好"]


def test_jsonl_lines_are_split_on_newlines_only(tmp_path):
    records = [{"prompt": "a\u2028b\x85c", "response": "d\x0ce\x1cf"}, {"prompt": "g", "response": "h"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    assert [r.data for r in read_records(path)] == records
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes(b'{"prompt": "a", "response": "b"}\r\n\r\n{"prompt": "c", "response": "d"}\r\n')
    assert [r.location for r in read_records(crlf)] == [f"{crlf} line 1", f"{crlf} line 3"]


def test_jsonl_read_a_line_at_a_time_gives_the_records_of_the_whole_file(tmp_path):
    import pytest

    from rlhf_time.data.readers import count_jsonl_records, iter_jsonl_records
    from rlhf_time.errors import RlhfTimeError

    lines = ['{"prompt": "a\u2028b", "response": "c"}', "", "  ", '{"prompt": "问", "response": "答"}\r', '{"prompt": "x"}']
    path = tmp_path / "t.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8-sig"))
    assert list(iter_jsonl_records(path)) == read_records(path) and count_jsonl_records(path) == 3
    assert [r.location for r in iter_jsonl_records(path)] == [f"{path} line {n}" for n in (1, 4, 5)]
    path.write_text('{"prompt": "a"}\n{"prompt": \n', encoding="utf-8")
    with pytest.raises(RlhfTimeError, match=r"t.jsonl line 2: malformed JSON"):
        list(iter_jsonl_records(path))
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(RlhfTimeError) as whole_file:
        read_records(path)
    assert f"at byte {path.read_bytes().index(0xE9)})" in str(whole_file.value)
    with pytest.raises(RlhfTimeError) as line_by_line:
        count_jsonl_records(path)
    assert str(line_by_line.value) == str(whole_file.value)
