"""Measuring sample lengths at scale: each distinct sample once, shared over the processes, kept across a kill.

The tiny LLaVA's processor measures for real; the measuring function is wrapped to count what it is given.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("trl")

import training.lengths as lengths_module  # noqa: E402
from tests import tiny_models  # noqa: E402
from training import StageDataError  # noqa: E402
from training.data import Sample, read_stage_file  # noqa: E402
from training.lengths import measure_lengths, processor_fingerprint, read_length_cache, stage_lengths  # noqa: E402
from training.modeling import load_processing_class  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COPIES = 10


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lengths")


@pytest.fixture(scope="module")
def tiny_vlm(workdir) -> Path:
    return tiny_models.build_tiny_vlm(workdir / "tiny-llava")


@pytest.fixture(scope="module")
def processor(tiny_vlm):
    return load_processing_class(str(tiny_vlm), "vlm")


@pytest.fixture(scope="module")
def curriculum(workdir) -> Path:
    return tiny_models.build_curriculum(workdir / "curriculum")


def distinct_records(curriculum: Path) -> list[dict]:
    """Four different samples: text-only, one image, one image with a longer answer, two images."""
    by_id = {}
    for stage in ("stage1", "stage3"):
        for line in (curriculum / stage / "messages.jsonl").read_text().splitlines():
            record = json.loads(line)
            record["images"] = [str((curriculum / stage / image).resolve()) for image in record["images"]]
            by_id[record["id"]] = record
    chosen = [by_id[name] for name in ("q0-text", "cred-cot", "cgreen-cot", "cblue-cot2")]
    # Lengths that all differ, so a copy given another sample's length shows.
    chosen[2]["messages"][-1]["content"][0]["text"] += " Checked twice."
    return chosen


def repeated_stage(folder: Path, records: list[dict], copies: int = COPIES) -> list[Sample]:
    """A stage file holding every record ``copies`` times, as the dataset builder repeats a source: ``<id>#<n>``."""
    repeated = [{**record, "id": f"{record['id']}#{copy}"} for copy in range(copies) for record in records]
    return read_stage_file(tiny_models.write_stage(folder, repeated), stage="stage2").samples


class CountingMeasure:
    """Wraps the measuring function: which samples it measured, in order."""

    def __init__(self, monkeypatch) -> None:
        self.measured: list[str] = []
        original = lengths_module.iter_lengths

        def counting(samples, *args, **kwargs):
            for sample, lengths in zip(samples, original(samples, *args, **kwargs), strict=True):
                self.measured.append(sample.id)
                yield lengths

        monkeypatch.setattr(lengths_module, "iter_lengths", counting)


def answer(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def measure(samples, processor, cache_dir, fingerprint="tiny-llava", **kwargs):
    return stage_lengths(samples, processor, is_vlm=True, fingerprint=fingerprint, cache_dir=cache_dir, **kwargs)


def test_copies_of_a_sample_are_measured_once(processor, curriculum, tmp_path, monkeypatch):
    records = distinct_records(curriculum)
    samples = repeated_stage(tmp_path / "stage", records)
    assert len(samples) == 4 * COPIES
    reference = measure_lengths(samples[:4], processor, is_vlm=True)  # the first copy of each, measured directly
    counter = CountingMeasure(monkeypatch)

    lengths = measure(samples, processor, tmp_path / "cache")

    assert sorted(counter.measured) == sorted(f"{record['id']}#0" for record in records)
    assert set(lengths) == {sample.id for sample in samples}
    for sample in samples:
        assert lengths[sample.id] == reference[sample.id.split("#")[0] + "#0"]
    assert len({tuple(value) for value in reference.values()}) == 4  # four really different lengths

    # A rerun (another max_length, a resumed run) measures nothing; the same samples in another stage neither.
    measure(samples, processor, tmp_path / "cache")
    measure(samples[5:7], processor, tmp_path / "cache")
    assert len(counter.measured) == 4


def test_what_changes_a_length_is_measured_again(processor, curriculum, tmp_path, monkeypatch):
    """Same id, same question: another image, another answer or another processor is another measurement."""
    record = distinct_records(curriculum)[1]
    other_image = tmp_path / "bigger.png"
    Image.new("RGB", (64, 40), (10, 20, 30)).save(other_image)
    variants = [
        record,
        {**record, "images": [str(other_image)]},
        {**record, "messages": [record["messages"][0], {"role": "assistant", "content": "Another answer."}]},
    ]
    counter = CountingMeasure(monkeypatch)
    for index, variant in enumerate(variants):
        samples = read_stage_file(tiny_models.write_stage(tmp_path / f"v{index}", [variant]), stage="s").samples
        measure(samples, processor, tmp_path / "cache")
    assert len(counter.measured) == 3
    measure(samples, processor, tmp_path / "cache", fingerprint="another processor")
    assert len(counter.measured) == 4
    # An image rewritten in place at another size is measured again; a copy elsewhere, or new pixels, are not.
    Image.new("RGB", (20, 20), (10, 20, 30)).save(other_image)
    samples = read_stage_file(tiny_models.write_stage(tmp_path / "v1", [variants[1]]), stage="s").samples
    measure(samples, processor, tmp_path / "cache")
    assert len(counter.measured) == 5
    Image.new("RGB", (20, 20), (200, 0, 0)).save(tmp_path / "moved.png")
    moved = read_stage_file(
        tiny_models.write_stage(tmp_path / "v3", [{**variants[1], "images": [str(tmp_path / "moved.png")]}]), stage="s"
    ).samples
    measure(moved, processor, tmp_path / "cache")
    assert len(counter.measured) == 5


def test_an_image_is_known_by_the_size_the_trainer_sees(tmp_path):
    """A photo turned by its EXIF orientation is decoded turned (datasets applies it), so it is another length."""
    plain, turned, png = tmp_path / "plain.jpg", tmp_path / "turned.jpg", tmp_path / "plain.png"
    Image.new("RGB", (40, 20)).save(plain)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.new("RGB", (40, 20)).save(turned, exif=exif)
    Image.new("RGB", (40, 20)).save(png)
    assert lengths_module.image_identity(str(plain)) == lengths_module.image_identity(str(png)) == [40, 20, None]
    assert lengths_module.image_identity(str(turned)) == [40, 20, 6]
    assert lengths_module.image_identity(str(tmp_path / "missing.png")) is None
    sample = Sample(id="a", prompt=[{"role": "user", "content": "q"}], completion=[], images=[str(plain)])
    keys = lengths_module.sample_keys([sample, Sample(**{**sample.__dict__, "id": "b", "images": [str(turned)]})], "f")
    assert keys[0] != keys[1]


def test_a_killed_measurement_resumes_without_measuring_again(processor, curriculum, tmp_path, monkeypatch):
    samples = repeated_stage(tmp_path / "stage", distinct_records(curriculum), copies=3)
    complete = measure(samples, processor, tmp_path / "complete")
    lines = (tmp_path / "complete" / "rank-0.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) == 4

    # What a process killed while writing its third line leaves: two whole lines and a torn one, no newline.
    cache = tmp_path / "killed"
    cache.mkdir()
    (cache / "rank-0.jsonl").write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])
    counter = CountingMeasure(monkeypatch)

    resumed = measure(samples, processor, cache)

    assert resumed == complete
    assert counter.measured == [json.loads(line)["id"] for line in lines[2:]]
    # The torn line stays behind its own newline, so every line written after it parses.
    written = (cache / "rank-0.jsonl").read_text().splitlines()
    assert len(written) == 5 and [json.loads(line)["id"] for line in written[3:]] == counter.measured
    assert len(read_length_cache(cache)) == 4
    measure(samples, processor, cache)
    assert len(counter.measured) == 2


def test_a_measurement_that_fails_keeps_what_it_measured(processor, curriculum, tmp_path, monkeypatch):
    """A broken image mid-stage: the error names it, and the samples measured before it are not measured again."""
    records = distinct_records(curriculum)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    stage = [*records[:3], {**records[1], "id": "broken", "images": [str(broken)]}, records[3]]
    samples = read_stage_file(tiny_models.write_stage(tmp_path / "stage", stage), stage="s").samples
    counter = CountingMeasure(monkeypatch)
    with pytest.raises(StageDataError, match=r"'broken': cannot read image .*broken.png"):
        measure(samples, processor, tmp_path / "cache")
    assert counter.measured == ["q0-text", "cred-cot", "cgreen-cot"]

    broken.unlink()
    Image.new("RGB", (36, 30), (1, 2, 3)).save(broken)  # not the size of cred-cot's image, so not its length
    measure(samples, processor, tmp_path / "cache")
    assert counter.measured[3:] == ["broken", "cblue-cot2"]


TWO_RANKS = r"""
import json, os, sys
from pathlib import Path
from accelerate import PartialState
import training.lengths as lengths_module
from training.data import read_stage_file
from training.errors import StageDataError
from training.modeling import load_processing_class

state = PartialState(cpu=True)
out = Path(sys.argv[3])
measured = []
original = lengths_module.iter_lengths
def counting(samples, *args, **kwargs):
    for sample, lengths in zip(samples, original(samples, *args, **kwargs), strict=True):
        measured.append(sample.id)
        yield lengths
lengths_module.iter_lengths = counting

processor = load_processing_class(sys.argv[1], "vlm")
def run(stage_file):
    samples = read_stage_file(Path(stage_file), stage="s").samples
    return lengths_module.stage_lengths(
        samples, processor, is_vlm=True, fingerprint="tiny-llava", cache_dir=out / "cache", state=state
    )
result = {"rank": state.process_index, "world": state.num_processes, "lengths": run(sys.argv[2])}
result["measured"], measured[:] = list(measured), []
for phase, stage_file in (("failure", sys.argv[4]), ("mismatch", sys.argv[2 if state.process_index else 4])):
    try:
        run(stage_file)
        result[phase] = None
    except StageDataError as exc:
        result[phase] = str(exc)
(out / f"result-{state.process_index}.json").write_text(json.dumps(result))
state.wait_for_everyone()
state.destroy_process_group()
"""


def test_two_processes_share_the_measuring_and_all_finish(tiny_vlm, processor, curriculum, tmp_path):
    """A real two-process launch (gloo on CPU): each measures half of what is not cached, both get every length; a
    sample that breaks on one process, or processes that read different stages, end the measurement on both with
    the reason, instead of a hang until the launch's timeout."""
    records = distinct_records(curriculum)
    extra = [
        {**record, "id": f"{record['id']}-b", "messages": [record["messages"][0], answer(f"Answer {index}. " * index)]}
        for index, record in enumerate(records, start=1)
    ]
    samples = repeated_stage(tmp_path / "stage", records + extra, copies=3)
    reference = measure_lengths(samples, processor, is_vlm=True)
    # One sample is measured already (an earlier, killed run): neither process measures it again.
    seeded = stage_lengths(samples[:1], processor, is_vlm=True, fingerprint="tiny-llava", cache_dir=tmp_path / "cache")
    assert seeded == {samples[0].id: reference[samples[0].id]}

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    # Dealt in turn: rank 0 gets the first sample not cached, rank 1 the second, the broken one.
    failing = tiny_models.write_stage(
        tmp_path / "failing",
        [
            {**records[0], "id": "fresh", "messages": [records[0]["messages"][0], answer("Fresh.")]},
            {**records[1], "id": "broken", "images": [str(broken)]},
        ],
    )
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    launch += ["--master_port", str(port), str(script), str(tiny_vlm), str(tmp_path / "stage" / "messages.jsonl")]
    launched = subprocess.run(
        [*launch, str(tmp_path), str(failing)], env=env, capture_output=True, text=True, timeout=240
    )
    assert launched.returncode == 0, launched.stderr[-6000:]
    results = [json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in (0, 1)]
    assert [(result["rank"], result["world"]) for result in results] == [(0, 2), (1, 2)]
    assert results[0]["lengths"] == results[1]["lengths"] == reference
    first_copies = [sample.id for sample in samples[1:8]]  # the 7 distinct samples not cached, in file order
    assert results[0]["measured"] == first_copies[0::2] and results[1]["measured"] == first_copies[1::2]
    assert {path.name for path in (tmp_path / "cache").iterdir()} == {"rank-0.jsonl", "rank-1.jsonl"}
    assert len(read_length_cache(tmp_path / "cache")) == 8 + 1  # and the fresh sample measured before the failure
    assert "cannot read image" in results[1]["failure"] and "broken.png" in results[1]["failure"]
    assert "process 1 could not measure" in results[0]["failure"] and "cannot read image" in results[0]["failure"]
    # Processes that read different stages (here: two stage files) stop before measuring, all of them, saying so.
    assert all("process(es) [1] read other samples" in result["mismatch"] for result in results)
