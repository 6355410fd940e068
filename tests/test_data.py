"""Reading input layouts, sharding, and the output files as a journal (repair, prune, merge)."""

import json
from collections import Counter

import pytest

from mics_agents.data import parse_record, parse_shard, read_items, shard_of
from mics_agents.errors import MicsError
from mics_agents.outputs import OutputFiles, default_failed_path, merge_outputs


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_chiron_layout():
    record = {
        "rid": 17,
        "messages": [
            {"role": "user", "content": "**Question:** What does the CT show?"},
            {"role": "assistant", "content": "**Correct Answer:** Appendicitis"},
        ],
        "images": ["a/1.png", "a/2.png"],
        "presentation": "RLQ pain",
        "age_label": "23",
        "gender_label": "Female",
        "caption": ["<image> dilated appendix"],
    }
    item = parse_record(record, 4)
    assert item.error is None
    assert (item.rid, item.key, item.line) == ("17", "17", 4)
    assert item.question == "What does the CT show?" and item.answer == "Appendicitis"
    assert item.images == ["a/1.png", "a/2.png"]
    assert item.case_info == {"presentation": "RLQ pain", "age_label": "23", "gender_label": "Female",
                              "caption": ["<image> dilated appendix"]}


def test_plain_layout_and_missing_id():
    item = parse_record({"question": "Q?", "answer": "A", "images": "x.png", "case_info": "note"}, 9)
    assert item.error is None and item.rid == "line-9" and item.images == ["x.png"] and item.case_info == "note"


@pytest.mark.parametrize(
    "record, message",
    [
        ([1, 2], "line 3: expected a JSON object, got list"),
        ({"id": "a", "answer": "x"}, "line 3: field 'question' is missing or empty"),
        ({"id": "a", "question": "q"}, "line 3: field 'answer' is missing or empty"),
        ({"rid": "a", "messages": [{"content": "**Question:** q"}]}, "line 3: field 'messages' must hold"),
        ({"rid": "a", "messages": [{"content": "**Question:** q"}, {"content": "**Correct Answer:**"}]},
         "line 3: field 'messages[1].content' is missing or empty"),
        ({"id": "a", "question": "q", "answer": "x", "images": [3]}, "line 3: field 'images' must be a list"),
        ({"id": "a", "question": "q", "answer": "x", "case_info": 5}, "line 3: field 'case_info' must be"),
    ],
)
def test_layout_errors_say_line_and_field(record, message):
    assert parse_record(record, 3).error.startswith(message)


def test_read_items_streams_bad_lines_and_duplicates(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [
        json.dumps({"id": "a", "question": "q", "answer": "x"}),
        "{not json",
        "",
        json.dumps({"id": "a", "question": "q2", "answer": "y"}),
    ])
    items = list(read_items(path))
    assert [item.line for item in items] == [1, 2, 4]
    assert items[0].error is None
    assert items[1].error.startswith("line 2: invalid JSON") and items[1].key == "line-2"
    assert items[2].key == "a@line4"
    assert "duplicate id 'a' (first seen on line 1)" in items[2].error


def test_shards_partition_items_exactly_once():
    keys = [f"case-{i}" for i in range(3000)]
    for shards in (1, 2, 3, 7):
        owners = Counter(shard_of(key, shards) for key in keys)
        assert sum(owners.values()) == len(keys) and set(owners) == set(range(shards))
        # Roughly even (a hash, not a round robin).
        assert min(owners.values()) > len(keys) / shards * 0.8
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(ValueError, match="I/N"):
            parse_shard(bad)


def test_default_failed_path(tmp_path):
    assert default_failed_path(tmp_path / "out.jsonl").name == "out_failed.jsonl"
    assert default_failed_path(tmp_path / "out").name == "out_failed.jsonl"


def test_prepare_repairs_a_torn_tail_and_keeps_the_lines_of_failures_it_retries(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"rid":"a"}\n{"rid":"b"}\n{"rid":"c","reas', encoding="utf-8")
    failed = default_failed_path(out)
    write_lines(failed, [
        json.dumps({"rid": "d", "key": "d", "error": {"kind": "no_path", "message": "m"}}),
        json.dumps({"rid": "e", "key": "e", "error": {"kind": "model_error", "message": "m"}}),
        json.dumps({"rid": "f", "key": "f@line9", "error": {"kind": "bad_input", "message": "m"}}),
    ])
    failures = failed.read_text()
    state = OutputFiles(out).prepare()
    assert out.read_text() == '{"rid":"a"}\n{"rid":"b"}\n'
    assert state.repaired_lines == 1
    assert state.done == {"a", "b", "d", "f@line9"}
    assert state.retried_failures == 1
    # A failure to redo keeps its line until the new outcome is appended (the journal only grows).
    assert failed.read_text() == failures
    # --retry-failed redoes every failure.
    again = OutputFiles(out).prepare(retry_failed=True)
    assert again.done == {"a", "b"} and again.retried_failures == 3 and failed.read_text() == failures


def test_prepare_refuses_a_corrupt_middle_line(tmp_path):
    out = write_lines(tmp_path / "out.jsonl", ['{"rid":"a"}', "garbage", '{"rid":"b"}'])
    with pytest.raises(MicsError, match="out.jsonl:2 is not valid JSON"):
        OutputFiles(out).prepare()


async def test_appended_lines_are_whole(tmp_path):
    files = OutputFiles(tmp_path / "out.jsonl")
    files.prepare()
    await files.append_success([{"rid": "x", "reasoning": "é\n### Step 1"}])
    await files.append_failure({"rid": "y", "key": "y", "error": {"kind": "bad_input", "message": "m"}})
    files.close()
    assert json.loads((tmp_path / "out.jsonl").read_text())["reasoning"] == "é\n### Step 1"
    assert json.loads((tmp_path / "out_failed.jsonl").read_text())["rid"] == "y"


def test_merge_joins_shards_and_refuses_overlaps(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_lines(a, [json.dumps({"rid": "1"}), json.dumps({"rid": "2"})])
    write_lines(default_failed_path(a), [json.dumps({"rid": "3", "key": "3", "error": {"kind": "no_path"}})])
    write_lines(b, [json.dumps({"rid": "4"})])
    report = merge_outputs([a, b], tmp_path / "all.jsonl")
    assert (report.successes, report.failures, report.overlaps) == (3, 1, 0)
    assert len((tmp_path / "all.jsonl").read_text().splitlines()) == 3
    assert len((tmp_path / "all_failed.jsonl").read_text().splitlines()) == 1

    write_lines(b, [json.dumps({"rid": "4"}), json.dumps({"rid": "3", "marker": "success"})])
    with pytest.raises(MicsError, match="--dedupe"):
        merge_outputs([a, b], tmp_path / "all.jsonl")
    report = merge_outputs([a, b], tmp_path / "all.jsonl", dedupe=True)
    merged = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert {r["rid"] for r in merged} == {"1", "2", "3", "4"}, "the success of item 3 wins over its failure"
    assert (tmp_path / "all_failed.jsonl").read_text() == ""
    assert report.overlaps == 1


def test_a_byte_order_mark_does_not_break_the_first_line(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes("\ufeff".encode() + json.dumps({"id": "a", "question": "q", "answer": "x"}).encode() + b"\n")
    [item] = read_items(path)
    assert item.error is None and item.rid == "a"
