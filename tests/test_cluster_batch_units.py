"""``mics run --ray --batch`` without a cluster (issue 29): a batched shard's task starts its run with
--no-wait and, while the run exits 75 (every item waits on a batch in progress), starts it again after the
poll interval until it ends otherwise; a cancel between two runs stops it at once; the user's own --no-wait
returns the 75; what the shard's open batches are counted at reaches the board and its spent file, and the
driver counts it against the budget."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from mics_agents.batches import queue as batch_queue
from mics_agents.cluster import shard_task
from mics_agents.cluster.ray_run import RayRun
from mics_agents.cluster.shard_task import ShardJob, read_committed, read_spent, run_shard

from .test_cluster_units import _Board


def fake_run(folder: Path, body: str) -> None:
    """What ``python -m mics_agents`` finds first in the shard's folder: a stand-in for the shard's run. It sees
    its arguments as ``args`` and its environment as ``env``; ``runs`` counts its starts (a file beside it)."""
    package = folder / "mics_agents"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(
        "import json, os, sys, time\n"
        "from pathlib import Path\n"
        "args, env = sys.argv[1:], os.environ\n"
        f"counter = Path({str(folder / 'runs.txt')!r})\n"
        "runs = int(counter.read_text()) + 1 if counter.exists() else 1\n"
        "counter.write_text(str(runs))\n"
        "with open(counter.with_name('calls.jsonl'), 'a') as log:\n"
        "    log.write(json.dumps({'args': args, 'committed_file': env.get('MICS_BATCH_COMMITTED_FILE')}) + '\\n')\n"
        + body)


def calls(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "calls.jsonl").read_text().splitlines()]


def test_the_variable_the_queue_reads_is_the_one_the_task_sets():
    assert shard_task.COMMITTED_FILE_VARIABLE == batch_queue.COMMITTED_FILE_VARIABLE
    assert shard_task.EXIT_BATCHES_PENDING == 75


def test_a_batched_shard_is_run_again_while_its_items_wait_on_batches_then_ends(tmp_path):
    fake_run(tmp_path, "sys.exit(75 if runs < 3 else 0)\n")
    started = time.monotonic()
    result = run_shard(ShardJob(0, 1, tmp_path / "out.jsonl", ["data.jsonl", "--batch"], lock_wait=0,
                                batch_rerun_every=0.3), _Board())
    assert result["exit_code"] == 0 and result["batch_reruns"] == 2 and not result["cancelled"], result
    assert time.monotonic() - started >= 0.6  # it waited the interval between runs
    seen = calls(tmp_path)
    assert len(seen) == 3 and all("--no-wait" in call["args"] and "--batch" in call["args"] for call in seen)
    assert all(call["committed_file"] == str(tmp_path / "out.committed.json") for call in seen)


def test_an_unbatched_shard_is_never_run_again_and_gets_no_committed_file(tmp_path):
    fake_run(tmp_path, "sys.exit(75)\n")  # (a run that is not batched never exits 75; if it did, it stands)
    result = run_shard(ShardJob(0, 1, tmp_path / "out.jsonl", ["data.jsonl"], lock_wait=0,
                                batch_rerun_every=0.1), _Board())
    assert result["exit_code"] == 75 and result["batch_reruns"] == 0
    assert calls(tmp_path) == [{"args": calls(tmp_path)[0]["args"], "committed_file": None}]
    assert "--no-wait" not in calls(tmp_path)[0]["args"]


def test_the_users_own_no_wait_returns_75_after_one_run(tmp_path):
    fake_run(tmp_path, "sys.exit(75)\n")
    result = run_shard(ShardJob(0, 1, tmp_path / "out.jsonl", ["data.jsonl", "--batch", "--no-wait"], lock_wait=0,
                                batch_rerun_every=None), _Board())
    assert result["exit_code"] == 75 and result["batch_reruns"] == 0 and len(calls(tmp_path)) == 1


def test_a_cancel_while_the_shard_waits_between_runs_stops_it_at_once(tmp_path):
    """The adversarial case: a cancel that lands in the wait between two runs (no run to signal)."""
    fake_run(tmp_path, "sys.exit(75)\n")

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 2.0)
    started = time.process_time(), time.monotonic()
    try:
        result = run_shard(ShardJob(0, 1, tmp_path / "out.jsonl", ["data.jsonl", "--batch"], lock_wait=0,
                                    batch_rerun_every=600.0), _Board())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert result["cancelled"] and result["exit_code"] == 130 and result["batch_reruns"] == 1, result
    assert len(calls(tmp_path)) == 1  # not started again after the cancel
    assert time.process_time() - started[0] < 5.0  # the wait polls; it does not spin


def test_what_open_batches_are_counted_at_reaches_the_board_and_the_spent_file(tmp_path):
    fake_run(tmp_path, "import sqlite3\n"
                       "sqlite3.connect(args[args.index('--cache') + 1]).close()\n"  # its node-local cache
                       "Path(env['MICS_BATCH_COMMITTED_FILE']).write_text(json.dumps({'committed_usd': 0.7}))\n"
                       "time.sleep(1.5)\n"
                       "sys.exit(3)\n")
    board = _Board()
    result = run_shard(ShardJob(0, 1, tmp_path / "out.jsonl", ["data.jsonl", "--batch"], lock_wait=0,
                                batch_rerun_every=0.1), board)
    assert result["exit_code"] == 3 and result["batch_reruns"] == 0
    assert board.snapshots[-1]["committed_usd"] == 0.7 and board.snapshots[0]["committed_usd"] == 0.0
    shard = tmp_path / "out.jsonl"
    assert read_committed(shard) == 0.7 and read_spent(shard) == 0.0  # checkpointed for the next driver


def test_a_committed_file_that_is_garbage_counts_nothing_and_fails_nothing(tmp_path):
    fake_run(tmp_path, "Path(env['MICS_BATCH_COMMITTED_FILE']).write_text('{\"committed_usd\": -5')\n"
                       "time.sleep(0.7)\n")
    board = _Board()
    result = run_shard(ShardJob(0, 1, tmp_path / "out.jsonl", ["data.jsonl", "--batch"], lock_wait=0), board)
    assert result["exit_code"] == 0 and board.snapshots[-1]["committed_usd"] == 0.0


def test_the_driver_counts_committed_batches_against_the_budget(tmp_path):
    run = RayRun(output=tmp_path / "out.jsonl", run_args=[], total=4, budget_usd=1.0)
    run._committed_before = {0: 0.2, 1: 0.3}
    run._spent_before = {0: 0.1, 1: 0.0}
    run._update({0: {"spent_usd": 0.25, "committed_usd": 0.4}})  # shard 1 has not reported: its file counts
    assert round(run.stats.spent_usd, 6) == 0.25 and round(run.committed_usd, 6) == 0.7
    assert "$0.7000 in batches still open" in run._committed_words()

    def final(codes: list[int], reason: str = "completed") -> str:
        run.stats.stop_reason = reason
        run.results = [{"index": index, "exit_code": code} for index, code in enumerate(codes)]
        run._final()
        return run.stats.stop_reason

    assert final([0, 75]) == "waiting" and run.failed_shards() == []  # --no-wait: shards left waiting
    assert final([75, 3]) == "budget"
    assert final([1, 75]) == "interrupted" and [r["index"] for r in run.failed_shards()] == [0]


def test_a_budget_committed_by_former_sessions_starts_no_shard(tmp_path, monkeypatch):
    """Batches a former run left open count: their estimate alone can exhaust the budget before any shard runs."""
    from mics_agents.cluster import ray_run

    shard = tmp_path / "out.shard-0-of-1.jsonl"
    shard_task._write_spent(shard, 0.1, 0.95)
    started = []

    class FakeRay:
        def remote(self, **options):
            return lambda target: type("Remote", (), {"remote": lambda *a, **k: started.append(a)})

    events: list[str] = []
    run = ray_run.RayRun(output=tmp_path / "out.jsonl", run_args=[], total=4, shards=1, budget_usd=1.0, lock_wait=0,
                         on_event=events.append)
    stats = run._run(FakeRay())
    assert stats.stop_reason == "budget" and [job for job in started if job] == []  # (the board takes no args)
    assert "no shard starts" in events[-1] and "$0.9500 in batches still open" in events[-1]


def test_batch_models_a_shard_would_refuse_are_refused_before_ray_starts(tmp_path):
    """One line, exit 2, before Ray is even imported (here it is not installed): not N shards failing alike."""
    from .test_run_process import flat, mics_env, run_args, run_mics, write_dataset
    from .openai_server import OpenAIServer

    blocker = tmp_path / "no-ray" / "ray"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    data = write_dataset(tmp_path / "data")
    with OpenAIServer(lifetime=60) as server:
        env = mics_env(server, PYTHONPATH=str(blocker.parent), MICS_BATCH_MODELS="openai/not-in-this-run")
        refused = run_mics(run_args(data, tmp_path / "out.jsonl", tmp_path / "c.sqlite", "--ray", "--batch"), env,
                           tmp_path)
    assert refused.returncode == 2 and "MICS_BATCH_MODELS names 'openai/not-in-this-run'" in flat(refused.stderr)
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_the_board_grants_batches_one_shard_at_a_time_against_the_whole_budget():
    """The adversarial case: two shards ask at the same moment for most of the budget each. The board answers
    one after the other, the second counting the first's grant: never both."""
    from mics_agents.cluster.ray_run import _Board

    board = _Board(1.0, {0: 0.0, 1: 0.1})  # shard 1 spent 0.1 in a former session
    assert board.reserve(0, 0.0, 0.6)
    assert not board.reserve(1, 0.1, 0.6)  # 0.6 granted + 0.1 + 0.6 > 1.0
    assert board.reserve(1, 0.1, 0.3)  # what fits is granted
    assert not board.reserve(0, 0.6, 0.05)  # 0.6 + 0.05 + shard 1's 0.4 > 1.0
    # A report of more than was claimed (online calls beside the batches) counts as soon as it arrives.
    board.report(1, {"spent_usd": 0.35, "committed_usd": 0.3})
    assert not board.reserve(0, 0.3, 0.06)  # 0.3 + 0.06 + shard 1's 0.65 > 1.0
    assert board.reserve(0, 0.3, 0.04)
    assert _Board(None).reserve(0, 5.0, 5.0)  # no budget: every batch goes


def test_a_batched_shard_under_a_budget_asks_the_board_before_each_batch(tmp_path):
    """The run's queue asks through files in a node-local folder; the task answers with the board's verdict,
    and a refusal is reported at once (the driver stops every shard on it)."""
    fake_run(tmp_path, "import uuid\n"
                       "folder = Path(env['MICS_BATCH_GATE_DIR'])\n"
                       "verdicts = []\n"
                       "for own, estimate in ((0.0, 0.5), (0.5, 0.6)):\n"  # the second counts the first
                       "    name = uuid.uuid4().hex\n"
                       "    (folder / f'ask-{name}.json').write_text(json.dumps({'own': own, 'estimate': estimate}))\n"
                       "    while not (folder / f'ask-{name}.answer').exists():\n"
                       "        time.sleep(0.01)\n"
                       "    verdicts.append(json.loads((folder / f'ask-{name}.answer').read_text())['granted'])\n"
                       "counter.with_name('verdicts.json').write_text(json.dumps(verdicts))\n"
                       "time.sleep(0.3)\n"
                       "sys.exit(3 if not all(verdicts) else 0)\n")

    class Board(_Board):
        def __init__(self) -> None:
            super().__init__()
            from mics_agents.cluster.ray_run import _Board as Real

            self.real = Real(1.0)
            self.asked: list[tuple] = []
            outer = self

            class Reserve:
                @staticmethod
                def remote(index, own, estimate):
                    outer.asked.append((index, own, estimate))
                    return outer.real.reserve(index, own, estimate)

            self.reserve = Reserve()

    board = Board()
    result = run_shard(ShardJob(1, 2, tmp_path / "out.shard-1-of-2.jsonl", ["data.jsonl", "--batch"], lock_wait=0,
                                batch_rerun_every=0.1, budget_gate=True), board)
    assert json.loads((tmp_path / "verdicts.json").read_text()) == [True, False]
    assert board.asked == [(1, 0.0, 0.5), (1, 0.5, 0.6)]
    assert result["exit_code"] == 3 and board.snapshots[-1].get("budget_refused") is True
    gate = calls(tmp_path)[0]
    assert gate["args"].count("--no-wait") == 1
    assert not list(tmp_path.glob("ask-*"))


def test_the_queue_asks_the_gate_and_a_silent_gate_refuses(tmp_path, monkeypatch):
    """The queue's side: granted or refused as answered; no answer in GATE_PATIENCE_S refuses (never submits)."""
    import asyncio

    monkeypatch.setenv(batch_queue.GATE_FOLDER_VARIABLE, str(tmp_path))
    monkeypatch.setattr(batch_queue, "GATE_PATIENCE_S", 0.3)
    queue = batch_queue.BatchQueue.__new__(batch_queue.BatchQueue)

    async def answered(granted: bool) -> bool:
        async def answer() -> None:
            while not list(tmp_path.glob("ask-*.json")):
                await asyncio.sleep(0.01)
            ask = next(tmp_path.glob("ask-*.json"))
            assert json.loads(ask.read_text()) == {"own": 0.25, "estimate": 0.5}
            ask.with_suffix(".answer").write_text(json.dumps({"granted": granted}))

        verdict, _ = await asyncio.gather(queue._gate_allows(0.25, 0.5), answer())
        return verdict

    assert asyncio.run(answered(True)) is True
    assert asyncio.run(answered(False)) is False
    assert asyncio.run(queue._gate_allows(0.0, 0.1)) is False  # nobody answers
    assert list(tmp_path.iterdir()) == []  # each question and answer removed
    monkeypatch.delenv(batch_queue.GATE_FOLDER_VARIABLE)
    assert asyncio.run(queue._gate_allows(0.0, 99.0)) is True  # not under a shard's gate
