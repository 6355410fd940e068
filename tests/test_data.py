"""Reading input layouts, sharding, and the output files as a journal (repair, prune, merge)."""

import json
from collections import Counter

import pytest

from mics_agents.data import duplicate_key, made_up_key, parse_record, parse_shard, read_items, shard_of
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
    assert item.error is None and item.rid == item.key == "line-9" and item.images == ["x.png"] and item.case_info == "note"


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
    assert items[1].error.startswith("line 2: invalid JSON") and items[1].key == made_up_key(2) and items[1].rid is None
    assert items[2].key == duplicate_key("a", 4) and items[2].rid == "a"
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
    out.write_text('{"rid":"a","gt_answer":"x"}\n{"rid":"b","gt_answer":"x"}\n{"rid":"c","reas', encoding="utf-8")
    failed = default_failed_path(out)
    write_lines(failed, [
        json.dumps({"rid": "d", "key": "d", "error": {"kind": "no_path", "message": "m"}}),
        json.dumps({"rid": "e", "key": "e", "error": {"kind": "model_error", "message": "m"}}),
        json.dumps({"rid": "f", "key": duplicate_key("f", 9), "line": 9, "error": {"kind": "bad_input", "message": "m"}}),
    ])
    failures = failed.read_text()
    state = OutputFiles(out).prepare()
    assert out.read_text() == '{"rid":"a","gt_answer":"x"}\n{"rid":"b","gt_answer":"x"}\n'
    assert state.repaired_lines == 1
    assert state.done == {"a", "b", "d", duplicate_key("f", 9)}
    assert state.retried_failures == 1
    # A failure to redo keeps its line until the new outcome is appended (the journal only grows).
    assert failed.read_text() == failures
    # --retry-failed redoes every failure.
    again = OutputFiles(out).prepare(retry_failed=True)
    assert again.done == {"a", "b"} and again.retried_failures == 3 and failed.read_text() == failures


def test_prepare_refuses_a_corrupt_middle_line(tmp_path):
    out = write_lines(tmp_path / "out.jsonl", ['{"rid":"a","gt_answer":"x"}', "garbage", '{"rid":"b","gt_answer":"x"}'])
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
    write_lines(a, [json.dumps({"rid": "1", "gt_answer": "x"}), json.dumps({"rid": "2", "gt_answer": "x"})])
    write_lines(default_failed_path(a), [json.dumps({"rid": "3", "key": "3", "error": {"kind": "no_path"}})])
    write_lines(b, [json.dumps({"rid": "4", "gt_answer": "x"})])
    report = merge_outputs([a, b], tmp_path / "all.jsonl")
    assert (report.successes, report.failures, report.overlaps) == (3, 1, 0)
    assert len((tmp_path / "all.jsonl").read_text().splitlines()) == 3
    assert len((tmp_path / "all_failed.jsonl").read_text().splitlines()) == 1

    write_lines(b, [json.dumps({"rid": "4", "gt_answer": "x"}), json.dumps({"rid": "3", "gt_answer": "x", "marker": "success"})])
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


# -- hostile input (issue 15): every line gives one item, whatever is wrong with it --------------------


def test_no_line_stops_the_reading_and_each_says_line_field_and_value(tmp_path, monkeypatch):
    import mics_agents.data as data_module

    monkeypatch.setattr(data_module, "MAX_LINE_BYTES", 200_000)
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"".join([
        b"[" * 100_000 + b"\n",                                                                       # 1
        b'{"id": "s", "question": "a \\ud800 b", "answer": "x"}\n',                                     # 2
        b'{"id": "x\\u0000y", "question": "q", "answer": "x"}\n',                                       # 3
        json.dumps({"id": "c", "question": "q", "answer": "x", "case_info": {"caption": 5}}).encode() + b"\n",  # 4
        json.dumps({"id": "p", "question": "q", "answer": "x", "images": ["a\u0000b.png"]}).encode() + b"\n",   # 5
        json.dumps({"id": "many", "question": "q", "answer": "x", "images": ["a.png"] * 33}).encode() + b"\n",  # 6
        b'{"id": "long", "question": "' + b"x" * 300_000 + b'"}\n',                                    # 7
        json.dumps({"id": 3.5, "question": "q", "answer": "x"}).encode() + b"\r\n",                    # 8
        json.dumps({"id": float("inf"), "question": "q", "answer": "x"}).encode() + b"\n",              # 9 (Infinity)
        json.dumps({"question": "q", "answer": "x"}).encode() + b"\n",                                 # 10
    ]))
    items = {item.line: item for item in read_items(path)}
    assert sorted(items) == list(range(1, 11))
    assert "nested deeper than 64 levels" in items[1].error and items[1].key == made_up_key(1)
    assert items[1].raw == "[" * 2000  # the start of the line, not the whole of it
    assert items[2].rid == "s" and "field 'question' holds a lone surrogate '\\ud800' at position 2" in items[2].error
    assert items[3].rid is None and "field 'id' holds the control character '\\x00'" in items[3].error
    assert "field 'case_info.caption' must be a string or a list of strings" in items[4].error
    assert "field 'images[0]'" in items[5].error and "control character" in items[5].error
    assert "lists 33 images; a case may have at most 32" in items[6].error
    assert items[7].key == made_up_key(7) and items[7].error.startswith("line 7: longer than 200,000 bytes")
    assert len(items[7].raw) == 2000
    assert items[8].error is None and items[8].key == "3.5"
    assert items[9].key == made_up_key(9) and "must be a finite number" in items[9].error
    assert items[10].error is None and items[10].key == "line-10"
    assert all(item.error.startswith(f"line {number}:") for number, item in items.items() if item.error)


def test_a_byte_order_mark_alone_or_with_crlf_is_a_blank_line(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf\r\n\r\n" + json.dumps({"id": "a", "question": "q", "answer": "x"}).encode() + b"\r\n")
    [item] = read_items(path)
    assert item.line == 3 and item.error is None and item.rid == "a"


def test_made_up_keys_never_equal_a_real_id_and_an_id_like_one_is_flagged(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [
        "{broken",                                                                  # 1: made up, no id
        json.dumps({"id": "line-1", "question": "q", "answer": "x"}),               # 2: a real id "line-1"
        json.dumps({"question": "q", "answer": "x"}),                               # 3: no id: "line-3"
        json.dumps({"id": "line-3", "question": "q", "answer": "x"}),               # 4: collides with 3's
        json.dumps({"id": "a", "question": "q", "answer": "x"}),                    # 5
        json.dumps({"id": "a@line7", "question": "q", "answer": "x"}),              # 6: old duplicate key form
        json.dumps({"id": "a", "question": "q", "answer": "x"}),                    # 7: duplicate of 5
    ])
    items = list(read_items(path))
    keys = [item.key for item in items]
    assert len(set(keys)) == len(keys)
    assert keys[0] == made_up_key(1) and keys[1] == "line-1" and items[1].error is None
    assert "'line-3', which was made up for line 3 (it has none)" in items[3].error
    assert keys[5] == "a@line7" and items[5].error is None and keys[6] == duplicate_key("a", 7)


def test_failed_lines_under_old_made_up_keys_are_recognised_on_resume(tmp_path):
    from mics_agents.outputs import failure_key

    out = tmp_path / "out.jsonl"
    write_lines(default_failed_path(out), [json.dumps(record) for record in [
        {"rid": "line-1", "key": "line-1", "line": 1, "error": {"kind": "bad_input", "message": "m"}, "input": "{broken"},
        {"rid": "line-2", "key": "line-2", "line": 2, "error": {"kind": "bad_input", "message": "m"}, "input": None},
        {"rid": "True", "key": "True", "line": 3, "error": {"kind": "bad_input", "message": "m"}, "input": {"id": True}},
        {"rid": "a", "key": "a@line9", "line": 9, "error": {"kind": "bad_input", "message": "m"}, "input": {"id": "a"}},
        # A real id that reads like a made-up one stays itself.
        {"rid": "line-4", "key": "line-4", "line": 4, "error": {"kind": "bad_input", "message": "m"}, "input": {"id": "line-4"}},
        {"rid": "line-5", "key": "line-5", "line": 5, "error": {"kind": "bad_input", "message": "m"}, "input": {"question": "q"}},
    ]])
    state = OutputFiles(out).prepare()
    assert state.done == {made_up_key(1), made_up_key(2), made_up_key(3), duplicate_key("a", 9), "line-4", "line-5"}
    assert failure_key({"rid": "x", "key": "x", "line": 1}) == "x"


def test_shards_of_made_up_keys_are_those_of_their_old_form():
    for shards in (2, 3, 5):
        assert shard_of(made_up_key(17), shards) == shard_of("line-17", shards)
        assert shard_of(duplicate_key("a", 9), shards) == shard_of("a@line9", shards)


@pytest.mark.parametrize(
    "name, lines, fragment",
    [
        ("out.jsonl", [json.dumps({"id": "a", "question": "q", "answer": "x"})], "out.jsonl is not an output of mics-agents"),
        ("out.jsonl", [json.dumps({"rid": "a", "messages": [{"content": "q"}, {"content": "a"}]})], "has no 'gt_answer'"),
        ("out.jsonl", ["[]"], "it is a JSON list, not an object"),
        ("out_failed.jsonl", [json.dumps({"rid": "a", "key": "a", "error": "oops"})], "its 'error' is not an object"),
        ("out.jsonl", [json.dumps({"rid": "a", "gt_answer": "x"}), json.dumps({"id": "b"})], "out.jsonl:2 is not a line mics-agents writes"),
    ],
)
def test_files_we_did_not_write_are_refused_before_anything_is_written(tmp_path, name, lines, fragment):
    from mics_agents.errors import ForeignOutputError

    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines) + '{"torn', encoding="utf-8")  # a torn tail too
    before = path.read_bytes()
    with pytest.raises(ForeignOutputError) as caught:
        OutputFiles(tmp_path / "out.jsonl").prepare()
    assert fragment in str(caught.value) and "nothing was written" in str(caught.value)
    assert path.read_bytes() == before, "not even the torn tail was cut"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


async def test_text_without_a_utf8_form_is_written_escaped_and_reads_back_the_same(tmp_path):
    files = OutputFiles(tmp_path / "out.jsonl")
    files.prepare()
    record = {"rid": "s", "key": "s", "line": 1, "error": {"kind": "bad_input", "message": "m"},
              "input": {"question": "a \ud800 b \u2028 c \u0085"}}
    await files.append_failure(record)
    files.close()
    [line] = (tmp_path / "out_failed.jsonl").read_bytes().split(b"\n")[:-1]
    assert json.loads(line) == record
