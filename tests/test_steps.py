"""Step data from search trees: step-reward rows, sibling preference pairs, the split, and the exports."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from PIL import Image

from mics_agents.dataset import BuildOptions, Recipe, StepOptions, build_dataset, read_step_records, write_steps
from mics_agents.dataset.curriculum import is_held_out
from mics_agents.dataset.images import ImageCatalog
from mics_agents.dataset.steps import gap_key, scored_candidates, step_pairs, step_rows
from mics_agents.errors import ConfigError, InputError

from .scripted import ANSWER, CASE_INFO, QUESTION, intern, mentor, searcher, settings

REST = "SECRET-REST unscored step after the last selected node"
FINAL = "### The final answer is: Zebra syndrome"


def node(id, parent, depth, mentor, score, *, steps=None, reused=False, selected=False, step=None):
    steps = steps or [f"step of node {id}"]
    return {"id": id, "parent": parent, "depth": depth, "mentor": mentor, "steps": steps,
            "step": step if step is not None else "\n\n".join(f"### Step {depth}: {text}" for text in steps),
            "reused": reused, "score": score, "selected": selected, "samples": []}


def known_tree() -> list[dict]:
    """Three mentors, two depths: gaps of exactly the margin, one that is the margin only in exact arithmetic
    (0.7 - 0.2 is 0.49999999999999994 in floats), a reused node, a depth-1 node of two steps."""
    return [
        node(0, None, 1, "m/a", 0.5, steps=["a first", "a second"]),  # exactly at the default threshold
        node(1, None, 1, "m/b", 0.75, steps=["b first", "b second"], selected=True),
        node(2, None, 1, "m/c", 0.25, steps=["c first", "c second"]),
        node(3, 1, 2, "m/a", 0.2),
        node(4, 1, 2, "m/b", 1.0, reused=True, selected=True),
        node(5, 1, 2, "m/c", 0.7),
    ]


def record(rid="case-a", tree=None, *, images=("a.png",), strategy="mics", **extra) -> dict:
    return {"rid": rid, "strategy": strategy, "question": f"Which diagnosis for {rid}?\nA. Zebra\nB. Horse",
            "gt_answer": "A. Zebra", "images": list(images), "search_id": "1", "trend": "increasing",
            "reasoning": f"### Step 1: b first\n\n### Step 2: b second\n\n### Step 3: step of node 4\n\n"
                         f"### Step 4: {REST}\n\n{FINAL}",
            "final_answer_grade": {"answer": "A. Zebra", "correct": True, "judged_by": "exact", "grader_version": 3},
            "grader_version": 3, "tree": known_tree() if tree is None else tree, **extra}


def rows_and_pairs(rec, options=StepOptions()):
    candidates, skipped = scored_candidates(rec)
    rows = step_rows(rec, candidates, options, case_id="case", images=list(rec["images"]), source="run.jsonl")
    pairs, capped = step_pairs(rec, candidates, options, case_id="case", images=list(rec["images"]), source="run.jsonl")
    return rows, pairs, capped, skipped


def brute_force_pairs(tree, margin, cap):
    """Every sibling pair at least ``margin`` apart (exact fractions), at most ``cap`` per parent, largest gaps
    first: written independently of the module."""
    from fractions import Fraction

    kept = set()
    for parent, group in itertools.groupby(sorted(tree, key=lambda n: str(n["parent"])), key=lambda n: n["parent"]):
        group = list(group)
        found = [(Fraction(str(h["score"])) - Fraction(str(l["score"])), h["id"], l["id"])
                 for h in group for l in group if Fraction(str(h["score"])) - Fraction(str(l["score"])) >= Fraction(str(margin))]
        found.sort(key=lambda f: (-f[0], f[1], f[2]))
        kept |= {(h, l) for _, h, l in found[:cap]}
    return kept


# --- rows -----------------------------------------------------------------------------------------------


def test_every_scored_candidate_appears_once_with_its_exact_score_and_path():
    rows, _, _, skipped = rows_and_pairs(record())
    assert not skipped
    by_node = {row["node"]: row for row in rows}
    assert sorted(by_node) == [0, 1, 2, 3, 4, 5] and len(rows) == 6
    for tree_node in known_tree():
        assert by_node[tree_node["id"]]["scores"][-1] == tree_node["score"]
        assert by_node[tree_node["id"]]["completions"][-1] == tree_node["step"]
    # A depth-1 node of two steps is one completion; a depth-2 candidate carries the selected node before it.
    assert by_node[0]["completions"] == ["### Step 1: a first\n\n### Step 1: a second"]
    assert by_node[5]["completions"] == [known_tree()[1]["step"], known_tree()[5]["step"]]
    assert by_node[5]["scores"] == [0.75, 0.7]
    assert by_node[4]["reused"] is True and by_node[4]["selected"] is True
    assert {row["prompt"] for row in rows} == {record()["question"]}
    assert all(row["grader_version"] == 3 and row["source"] == "run.jsonl" and row["case_id"] == "case" for row in rows)


def test_labels_follow_the_threshold_strictly():
    rows, *_ = rows_and_pairs(record())
    by_node = {row["node"]: row for row in rows}
    assert by_node[0]["labels"] == [False]  # 0.5 is at the default threshold, not above it
    assert by_node[1]["labels"] == [True]
    assert by_node[4]["labels"] == [True, True]  # the reused continuation is scored like any node
    assert by_node[3]["labels"] == [True, False]
    assert by_node[5]["labels"] == [True, True]
    hard, *_ = rows_and_pairs(record(), StepOptions(label_threshold=0.0))  # Math-Shepherd's hard estimate
    assert {row["node"]: row["labels"][-1] for row in hard} == {0: True, 1: True, 2: True, 3: True, 4: True, 5: True}
    zero = record(tree=[node(0, None, 1, "m/a", 0.0), node(1, None, 1, "m/b", 0.25, selected=True)])
    assert [row["labels"] for row in rows_and_pairs(zero, StepOptions(label_threshold=0.0))[0]] == [[False], [True]]
    high, *_ = rows_and_pairs(record(), StepOptions(label_threshold=0.75))
    assert [row["labels"][-1] for row in high] == [False, False, False, False, True, False]


def test_the_unscored_rest_of_the_winning_solution_gets_no_row_and_no_label():
    rows, pairs, _, _ = rows_and_pairs(record())
    text = json.dumps([rows, pairs])
    assert REST not in text and FINAL not in text and "Zebra syndrome" not in text
    assert sum(len(row["labels"]) for row in rows) == sum(len(row["completions"]) for row in rows)
    assert max(len(row["completions"]) for row in rows) == 2  # the tree's depth, not the reasoning's 4 steps


def test_broken_or_unscored_nodes_give_no_row_and_are_counted():
    tree = [
        node(0, None, 1, "m/a", 0.5),
        node(1, None, 1, "m/b", None),  # never scored (a search cut short)
        node(2, 1, 2, "m/a", 1.0),  # under an unscored node
        node(3, 9, 2, "m/a", 1.0),  # its parent is not in the tree
        node(4, 5, 2, "m/a", 1.0), node(5, 4, 2, "m/b", 1.0),  # a cycle
        node(6, None, 1, "m/c", True),  # a bool is not a score
        node(7, None, 1, "m/c", 1.5),  # not a fraction
        node(8, 0, 3, "m/a", 1.0),  # its depth does not match its path
        node(0, None, 1, "m/z", 1.0),  # a repeated id
        node(9, 0, 2, "m/b", 0.25, step="", steps=["from steps"]),  # no rendered step: rendered from its steps
    ]
    rows, _, _, skipped = rows_and_pairs(record(tree=tree))
    assert [row["node"] for row in rows] == [0, 9]
    assert rows[1]["completions"][-1] == "### Step 2: from steps"
    assert skipped == {"unscored": 3, "unscored_ancestor": 1, "broken_path": 4, "duplicate_id": 1}


# --- pairs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("margin", [0.25, 0.5, 0.55, 0.8, 1.0])
@pytest.mark.parametrize("cap", [0, 1, 3, 10])
def test_pairs_exist_exactly_where_the_margin_allows_and_the_cap_holds(margin, cap):
    options = StepOptions(pair_margin=margin, max_pairs_per_node=cap)
    _, pairs, capped, _ = rows_and_pairs(record(), options)
    found = {(pair["chosen_node"], pair["rejected_node"]) for pair in pairs}
    assert found == brute_force_pairs(known_tree(), margin, cap)
    assert len(found) == len(pairs)
    assert capped == len(brute_force_pairs(known_tree(), margin, 99)) - len(pairs)
    for pair in pairs:
        assert pair["chosen_score"] - pair["rejected_score"] == pair["score_gap"] >= margin - 1e-9


def test_default_pairs_of_the_known_tree():
    _, pairs, capped, _ = rows_and_pairs(record())
    assert [(p["chosen_node"], p["rejected_node"]) for p in pairs] == [(1, 2), (4, 3), (5, 3)]
    assert capped == 0
    assert [gap_key(p["score_gap"]) for p in pairs] == ["0.50", "0.80", "0.50"]  # 0.7 - 0.2 counts as 0.5


def test_a_pair_is_the_user_turn_and_the_path_so_far_then_the_sibling_steps():
    _, pairs, _, _ = rows_and_pairs(record())
    at_root, deeper = pairs[0], pairs[1]
    tree = known_tree()
    assert at_root["parent"] is None and [m["role"] for m in at_root["prompt"]] == ["user"]
    assert at_root["chosen"] == [{"role": "assistant", "content": [{"type": "text", "text": tree[1]["step"]}]}]
    assert at_root["rejected"] == [{"role": "assistant", "content": [{"type": "text", "text": tree[2]["step"]}]}]
    assert deeper["parent"] == 1
    user, path = deeper["prompt"]
    assert path == {"role": "assistant", "content": [{"type": "text", "text": tree[1]["step"]}]}
    assert deeper["chosen"][0]["content"][0]["text"] == tree[4]["step"]
    assert deeper["rejected"][0]["content"][0]["text"] == tree[3]["step"]
    assert user["role"] == "user" and user["content"][-1]["text"].startswith(record()["question"])
    assert "final answer is" in user["content"][-1]["text"]  # the task instruction the curriculum's users see
    assert user["content"][0] == {"type": "image"}  # the record's one image, a bare placeholder


def test_siblings_with_the_same_text_make_no_pair():
    tree = [node(0, None, 1, "m/a", 1.0, step="### Step 1: same"), node(1, None, 1, "m/b", 0.0, step="### Step 1: same")]
    _, pairs, _, _ = rows_and_pairs(record(tree=tree))
    assert pairs == []


def test_settings_are_checked():
    for bad in ({"label_threshold": 1.0}, {"label_threshold": -0.1}, {"pair_margin": 0.0}, {"pair_margin": 1.5},
                {"max_pairs_per_node": -1}, {"max_pairs_per_node": 1.5}, {"label_threshold": float("nan")},
                {"pair_margin": True}):
        with pytest.raises(ConfigError):
            StepOptions(**bad)


# --- which records, and writing a folder ---------------------------------------------------------------


def png(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 20), (shade, 90, 200)).save(path)


def failure(rid, kind, tree) -> dict:
    search = {**record(rid, tree), "search_id": None, "reasoning": ""}
    return {"rid": rid, "key": rid, "line": 1, "error": {"kind": kind, "message": "..."}, "input": {}, "search": search}


def write_lines(path: Path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run: successes (one vanilla), a no_path and a model_error failure, and an item that failed then
    succeeded on the retry."""
    images = tmp_path / "images"
    png(images / "a.png", 10)
    png(images / "dup.png", 10)  # the same bytes as a.png under another name
    no_path_tree = [node(0, None, 1, "m/a", 0.5, selected=True), node(1, None, 1, "m/b", 0.0),
                    node(2, 0, 2, "m/a", 0.0), node(3, 0, 2, "m/b", 0.0)]
    write_lines(tmp_path / "out.jsonl", [
        record("ok-1"),
        record("vanilla-1", [node(0, None, 1, "m/a", 0.75, steps=["one", "two", "three"], selected=True)], strategy="vanilla"),
        record("retried", images=("dup.png",)),
        record("no-image", images=("missing.png",)),
    ])
    write_lines(tmp_path / "out_failed.jsonl", [
        failure("retried", "model_error", known_tree()),
        failure("nopath-1", "no_path", no_path_tree),
        failure("broken-1", "model_error", [node(0, None, 1, "m/a", 0.5), node(1, None, 1, "m/b", None)]),
    ])
    return tmp_path


def test_step_data_comes_from_successes_and_no_path_searches_only(run_dir):
    records = list(read_step_records([run_dir / "out.jsonl"]))
    assert [(source, rec["rid"]) for source, rec in records] == [
        ("out.jsonl", rid) for rid in ("ok-1", "vanilla-1", "retried", "no-image", "nopath-1")
    ]
    stats = write_steps(records, run_dir / "steps", image_dir=run_dir / "images", images_root=run_dir / "steps" / "images",
                        catalog=ImageCatalog(), options=StepOptions(), test_fraction=0.0, seed=0)
    rows = [json.loads(line) for line in (run_dir / "steps" / "steps.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (run_dir / "steps" / "pairs.jsonl").read_text().splitlines()]
    assert sorted({row["rid"] for row in rows}) == ["nopath-1", "ok-1", "retried"]
    assert len([row for row in rows if row["rid"] == "nopath-1"]) == 4
    assert [(p["rid"], p["chosen_node"], p["rejected_node"]) for p in pairs if p["rid"] == "nopath-1"] == [("nopath-1", 0, 1)]
    assert stats.rows == len(rows) == 16 and stats.pairs == len(pairs) == 7
    assert stats.records_skipped == {"vanilla": 1, "image_missing_or_unreadable": 1}
    assert stats.labels == {"true": sum(r["labels"][-1] for r in rows), "false": sum(not r["labels"][-1] for r in rows)}
    assert stats.as_dict()["gap_histogram"] == {"0.50": 5, "0.80": 2}
    # One image file for the two names of the same bytes, under its content hash.
    placed = {image for row in rows for image in row["images"]}
    assert len(placed) == 1 and (run_dir / "steps" / placed.pop()).is_file()


def test_a_missing_or_torn_output_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        list(read_step_records([tmp_path / "none.jsonl"]))
    (tmp_path / "torn.jsonl").write_text(json.dumps(record()) + "\n" + '{"rid": "x", "tree": [')
    with pytest.raises(InputError, match="torn.jsonl:2"):
        list(read_step_records([tmp_path / "torn.jsonl"]))


def test_exports_load_as_their_consumers_read_them(run_dir):
    from datasets import load_dataset, load_from_disk
    from trl.data_utils import prepare_multimodal_messages

    folder = run_dir / "steps"
    write_steps(read_step_records([run_dir / "out.jsonl"]), folder, image_dir=run_dir / "images",
                images_root=run_dir / "images_out", catalog=ImageCatalog(), options=StepOptions(), test_fraction=0.0, seed=0)
    rows = [json.loads(line) for line in (folder / "steps.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    cache = run_dir / "hf_cache"
    steps_json = load_dataset("json", data_files=str(folder / "steps.jsonl"), split="train", cache_dir=str(cache))
    pairs_json = load_dataset("json", data_files=str(folder / "pairs.jsonl"), split="train", cache_dir=str(cache))
    assert steps_json["labels"] == [row["labels"] for row in rows] and steps_json["scores"] == [row["scores"] for row in rows]
    assert pairs_json["chosen"] == [pair["chosen"] for pair in pairs]
    assert all((folder / image).is_file() for row in steps_json for image in row["images"])

    steps_hf, pairs_hf = load_from_disk(str(folder / "hf" / "steps")), load_from_disk(str(folder / "hf" / "pairs"))
    assert len(steps_hf) == len(rows) and len(pairs_hf) == len(pairs)
    for loaded, row in zip(steps_hf, rows):
        assert {k: v for k, v in loaded.items() if k != "images"} == {k: v for k, v in row.items() if k != "images"}
        assert [image.size for image in loaded["images"]] == [(24, 20)] * len(row["images"])
        assert all(isinstance(image, Image.Image) for image in loaded["images"])
    for loaded, pair in zip(pairs_hf, pairs):
        assert loaded["chosen"] == pair["chosen"] and loaded["score_gap"] == pair["score_gap"]
        # TRL's vision preference collator fills each image placeholder of the prompt with an image.
        filled = prepare_multimodal_messages(loaded["prompt"], images=loaded["images"])
        assert [part["image"] for part in filled[0]["content"] if part["type"] == "image"] == loaded["images"]


def test_an_empty_export_still_loads(tmp_path):
    from datasets import load_from_disk

    write_lines(tmp_path / "out.jsonl", [record("v", [node(0, None, 1, "m/a", 1.0)], strategy="vanilla")])
    stats = write_steps(read_step_records([tmp_path / "out.jsonl"]), tmp_path / "steps", image_dir=tmp_path,
                        images_root=tmp_path / "images", catalog=ImageCatalog(), options=StepOptions(), test_fraction=0, seed=0)
    assert stats.rows == stats.pairs == 0
    assert len(load_from_disk(str(tmp_path / "steps" / "hf" / "steps"))) == 0
    assert len(load_from_disk(str(tmp_path / "steps" / "hf" / "pairs"))) == 0


# --- a scripted search, and the split ------------------------------------------------------------------


async def test_a_scripted_search_gives_every_candidate_with_its_exact_score(tmp_path):
    config = settings(max_depth=3)
    # a leads at every depth (its next steps reused), ends on a full score, and its solution goes on unscored.
    a = mentor("m/a", {0: ["a1 [score=0.75]", "a2", "a3 [score=0.75]", "a4 [score=1.0]", "a5 never scored"]})
    b = mentor("m/b", {0: ["b1 [score=0.25]", "b2"], 2: ["b3 [score=0.5]"], 3: ["b4 [score=0.5]"]})
    c = mentor("m/c", {0: ["c1 [score=0.0]", "c2"], 2: ["c3 [score=0.25]"], 3: ["c4 [score=0.25]"]})
    result = await searcher([a, b, c], [intern("i/1", config), intern("i/2", config)], config=config).search(
        QUESTION, answer=ANSWER, case_info=CASE_INFO, rid="scripted-1")
    assert result.ok and result.search_id == "1" and len(result.tree) == 9
    assert sum(node.reused for node in result.tree) == 2
    write_lines(tmp_path / "out.jsonl", [result.to_record()])
    (searched,) = [rec for _, rec in read_step_records([tmp_path / "out.jsonl"])]
    candidates, skipped = scored_candidates(searched)
    assert not skipped
    assert sorted((c.node, c.score) for c in candidates) == sorted((n.id, n.score) for n in result.tree)
    rows, pairs, _, _ = rows_and_pairs(searched)
    assert [row["completions"][-1] for row in rows] == [n.step for n in result.tree]
    tree = [n.model_dump() for n in result.tree]
    assert {(p["chosen_node"], p["rejected_node"]) for p in pairs} == brute_force_pairs(tree, 0.5, 3)
    assert len(pairs) == 5
    assert "a5 never scored" in result.reasoning and "a5 never scored" not in json.dumps([rows, pairs])


def test_build_puts_a_cases_step_data_on_its_curriculum_side_only(tmp_path):
    """Two questions per case under one case id: the split holds out case ids, and step data follows it."""
    images = tmp_path / "images"
    cases, outputs = [], []
    for index in range(30):
        png(images / f"c{index}.png", index * 7)
        for question in (1, 2):
            rid = f"c{index}-q{question}"
            cases.append({"rid": rid, "case_id": f"case-{index}", "question": "Which?", "answer": "A. Zebra",
                          "images": [f"c{index}.png"], "caption": [f"<image> Axial CT of case {index}."]})
            outputs.append(record(rid, images=(f"c{index}.png",)))
    write_lines(tmp_path / "cases.jsonl", cases)
    write_lines(tmp_path / "out.jsonl", outputs)
    recipe = Recipe(stages={"stage3": {"part3_cot": 1.0}}, test_fraction=0.3, keep_trends=["increasing"])
    report = build_dataset(BuildOptions(mics=[tmp_path / "out.jsonl"], cases=tmp_path / "cases.jsonl", image_dir=images,
                                        output=tmp_path / "built", recipe=recipe, seed=5))
    built = tmp_path / "built"
    held_out = {f"case-{i}" for i in range(30) if is_held_out(f"case-{i}", 0.3, 5)}
    assert 0 < len(held_out) < 30
    rows = [json.loads(line) for line in (built / "steps" / "steps.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (built / "steps" / "pairs.jsonl").read_text().splitlines()]
    test_cases = {json.loads(line)["case_id"] for line in (built / "test" / "messages.jsonl").read_text().splitlines()}
    train_cases = {json.loads(line)["case_id"] for line in (built / "stage3" / "messages.jsonl").read_text().splitlines()}
    assert test_cases == held_out
    assert {row["case_id"] for row in rows} == {p["case_id"] for p in pairs} == train_cases == {f"case-{i}" for i in range(30)} - held_out
    assert len(rows) == 6 * 2 * len(train_cases) == report.step_rows and len(pairs) == report.step_pairs
    assert all((built / "steps" / image).resolve().parent.parent == (built / "images").resolve()
               for row in rows for image in row["images"])
    stats = json.loads((built / "stats.json").read_text())
    assert stats["steps"]["rows"] == len(rows) and stats["steps"]["pairs"] == len(pairs)
    assert stats["steps"]["records_skipped"] == {"held_out": 2 * len(held_out)}
