"""The command line: fast help, an offline demo, configuration errors that name the variable."""

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

MICS = [sys.executable, "-m", "mics_agents"]


def run(*args, env=None, cwd=None):
    return subprocess.run([*MICS, *args], capture_output=True, text=True, timeout=120, env=env, cwd=cwd)


def read_sorted(path: Path) -> list[dict]:
    """Records by id: a run writes them in the order items end."""
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda r: r["rid"])


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_help_is_fast():
    # CPU time of the child, not wall time: a loaded machine stretches the one, not the other.
    before = children_cpu_seconds()
    result = run("--help")
    spent = children_cpu_seconds() - before
    assert result.returncode == 0 and "demo" in result.stdout
    assert spent < 1.5, f"mics --help took {spent:.2f} s of CPU"


def test_demo_runs_offline_and_resumes_from_cache(tmp_path):
    first = run("demo", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "SIMULATED" in first.stdout and "MICS_MENTORS" in first.stdout
    records = read_sorted(tmp_path / "mics_demo_output.jsonl")
    assert [r["rid"] for r in records] == ["demo-brain-002", "demo-chest-001", "demo-liver-003"]
    assert all(r["reasoning"].startswith("### Step 1:") for r in records if r["search_id"] is not None)
    steps = tmp_path / "mics_demo_output_dataset" / "steps"
    rows, pairs = (len((steps / name).read_text().splitlines()) for name in ("steps.jsonl", "pairs.jsonl"))
    assert rows > 0 and pairs > 0
    assert f"Step data: {rows} step rows and {pairs} preference pairs -> mics_demo_output_dataset/steps/" in first.stdout
    second = run("demo", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    again = read_sorted(tmp_path / "mics_demo_output.jsonl")
    assert [r["usage"]["cached_calls"] for r in again] == [r["usage"]["calls"] for r in again]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "usage"} for r in rs]  # noqa: E731
    assert strip(again) == strip(records)


def test_search_without_models_is_a_configuration_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MICS_")}
    result = run("search", "What?", "--answer", "x", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "MICS_MENTORS" in result.stderr


def test_dataset_steps_makes_the_step_data_dataset_build_makes(tmp_path):
    from mics_agents.dataset.curriculum import is_held_out

    from .test_steps import failure, known_tree, node, png, record, write_lines

    png(tmp_path / "images" / "a.png", 10)
    cases, successes = [], []
    for index in range(12):
        rid = f"item-{index}"
        cases.append({"rid": rid, "case_id": f"case-{index // 2}", "question": "Which?", "answer": "A. Zebra",
                      "images": ["a.png"], "caption": ["<image> CT."]})
        successes.append(record(rid))
    write_lines(tmp_path / "cases.jsonl", cases)
    write_lines(tmp_path / "out.jsonl", successes)
    no_path = [node(0, None, 1, "m/a", 0.5, selected=True), node(1, None, 1, "m/b", 0.0)]
    searched, errored = (next(f"{kind}-{k}" for k in range(100) if not is_held_out(f"{kind}-{k}", 0.4, 3))
                         for kind in ("nopath", "error"))
    write_lines(tmp_path / "out_failed.jsonl", [failure(searched, "no_path", no_path),
                                                failure(errored, "model_error", known_tree())])
    common = ["--mics", "out.jsonl", "--image-dir", "images", "--seed", "3", "--test-fraction", "0.4"]
    made = run("dataset", "steps", *common, "--cases", "cases.jsonl", "-o", "steps_only", cwd=tmp_path)
    assert made.returncode == 0, made.stderr

    def lines(path):
        return [json.loads(line) for line in path.read_text().splitlines()]

    rows, pairs = lines(tmp_path / "steps_only" / "steps.jsonl"), lines(tmp_path / "steps_only" / "pairs.jsonl")
    assert f"{len(rows)} step rows" in made.stdout and f"{len(pairs)} preference pairs" in made.stdout
    assert searched in {row["rid"] for row in rows} and errored not in {row["rid"] for row in rows}
    stats = json.loads((tmp_path / "steps_only" / "stats.json").read_text())["steps"]
    assert stats["rows"] == len(rows) and stats["pairs"] == len(pairs) and stats["records_skipped"]["held_out"] > 0
    assert (tmp_path / "steps_only" / "stats.png").is_file()
    # The same seed and fraction (the default recipe's is 0.05, here 0.4 on both) hold out the same cases.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stages: {stage3: {part3_cot: 1.0}}\ntest_fraction: 0.4\n")
    built = run("dataset", "build", *common[:6], "--cases", "cases.jsonl", "--recipe", "recipe.yaml", "-o",
                "curriculum", cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    in_build = lines(tmp_path / "curriculum" / "steps" / "steps.jsonl")
    assert [row["id"] for row in in_build] == [row["id"] for row in rows]
    assert [row["labels"] for row in in_build] == [row["labels"] for row in rows]

    hard = run("dataset", "steps", *common, "--cases", "cases.jsonl", "-o", "hard", "--label-threshold", "0",
               "--pair-margin", "0.25", "--max-pairs-per-node", "1", cwd=tmp_path)
    assert hard.returncode == 0, hard.stderr
    hard_rows, hard_pairs = lines(tmp_path / "hard" / "steps.jsonl"), lines(tmp_path / "hard" / "pairs.jsonl")
    assert sum(row["labels"][-1] for row in hard_rows) > sum(row["labels"][-1] for row in rows)
    assert max(sum(1 for p in hard_pairs if (p["rid"], p["parent"]) == key)
               for key in {(p["rid"], p["parent"]) for p in hard_pairs}) == 1


def test_dataset_steps_refuses_bad_settings_and_inputs_without_a_traceback(tmp_path):
    from .test_steps import record, write_lines

    (tmp_path / "images").mkdir()
    write_lines(tmp_path / "out.jsonl", [record("x", images=())])
    base = ["dataset", "steps", "--mics", "out.jsonl", "--image-dir", "images"]
    for option, value in (("--pair-margin", "0"), ("--label-threshold", "1"), ("--max-pairs-per-node", "-1"),
                          ("--test-fraction", "1")):
        result = run(*base, "-o", "s", option, value, cwd=tmp_path)
        assert result.returncode == 2 and "Configuration error" in result.stderr and "Traceback" not in result.stderr
    missing = run("dataset", "steps", "--mics", "none.jsonl", "--image-dir", "images", "-o", "s", cwd=tmp_path)
    assert missing.returncode == 1 and "none.jsonl" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "taken").write_text("a file, not a folder")
    blocked = run(*base, "-o", "taken", cwd=tmp_path)
    assert blocked.returncode == 1 and "Traceback" not in blocked.stderr and "--output" in blocked.stderr
