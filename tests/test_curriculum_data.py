"""Curriculum data as a practitioner gets it: alignment targets in clean prose, modalities from Chiron-o1's
folders and case fields, and every export loaded back the way its own tool reads it.

The fixture cases copy the shapes of the published Chiron-o1 demo cases (src/demo_data/demo.jsonl): their
folder layout ``<rid>/<modality>_group<k>/<n>.png``, titles, presentations and captions ("According to the
<image>\\n, ...", several placeholders in a row, ``<br/>``, non-breaking spaces).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from mics_agents.dataset import BuildOptions, build_dataset, default_recipe
from mics_agents.dataset.alignment import clean_caption
from mics_agents.dataset.exports import internvl_repeat_time, relocate_internvl_meta
from mics_agents.dataset.samples import detect_modality, modality_evidence

# (rid, image paths, title, presentation, captions), after the demo cases.
DEMO = [
    ("169992", ["169992/ct_group1/0.png"], "Anomalous interarterial course of the left coronary artery",
     "Interscapular chest pain. Aortic dissection?",
     ["According to the <image>\n, no aortic dissection.\nIncidental anomalous course of the left coronary artery, "
      "which passes between the right ventricular outflow tract and the ascending aorta."]),
    ("159949", ["159949/ct_group1/0.jpeg", "159949/ct_group1/1.jpeg"],
     "\"Malignant\" anomalous interarterial course of the left coronary artery", "Chest pain and palpitations.",
     ["According to the <image>\n<image>\n, anomalous left main coronary artery origin arising from the right aortic "
      "sinus with an interarterial course between the aorta and the pulmonary artery. \u00a0Normal right coronary "
      "artery origin, course and caliber. Right dominant system."]),
    ("189353", ["189353/x-ray_group1/0.jpeg"], "Pacemaker lead fracture", "Pre-operative chest x-ray.",
     ["According to the <image>\n, right ventricular pacemaker with lead fracture at the expected site of the left "
      "subclavian vein entry site. No edema or pneumonia."]),
    ("190893", ["190893/ct_group1/0.jpeg"], "Myocardial bridging of the LAD", "Chest pain.",
     ["CORONARY ANATOMY:\n\u00a0The coronary arteries arise in normal position.\n\u00a0Left anterior descending: "
      "There is moderate eccentric calcified plaque in mid LAD with minimal (<25% stenosis). According to the "
      "<image>\n, there is bridging of distal LAD immediately distal to the origin of second diagonal (~ 3 cm long "
      "and ~ 0.3 cm deep) with a moderate stenosis (50-69%).\n\u00a0\nRV: Normal.\n\n\u00a0"]),
    ("158377", ["158377/x-ray_group1/0.jpeg"], "Mitral valve disease findings on plain chest x-ray",
     "Status post mitral valve replacement for known mitral regurgitation.",
     ["According to the <image>\n, status post mitral valve replacement with enlarged left atrial appendage. "
      "Lungs clear, no pleural effusion."]),
    ("178062", ["178062/ct_group1/0.jpeg"], "Normal CT head", "Headache 10 days after a MVA - bleed?",
     ["According to the <image>\n, no intracranial bleed.<br/>Frontal and parietal sulci mildly widened for "
      "patient's age.<br/>The pituitary gland is flattened against the sellar floor - empty sella."]),
    ("160688", ["160688/mammography_group1/0.png"], "Breast mass (BI-RADS 5)",
     "The right breast palpable mass on physical exam.",
     ["According to the <image>\n, a hyperdense mass with irregular and spiculated margins is noted in the lower "
      "outer quadrant of the right breast, which is highly suspicious. (BI-RADS 5)"]),
    ("177194", ["177194/ct_group1/0.png", "177194/ct_group1/1.png"], "CSF rhinorrhoea - CT cisternography",
     "History of prior head trauma, now abnormal watery fluid leaking from her nose.",
     ["According to the <image>\n<image>\n, cT cisternography in coronal and axial planes shows a contrast leak "
      "through the left cribriform plate to the left-sided anterior ethmoidal air cells. ",
      "Contrast leak and accumulation within the left-sided anterior ethmoid air cells."]),
    ("189817", ["189817/ultrasound_group1/0.png", "189817/ultrasound_group1/1.jpeg"],
     "Tricuspid regurgitation with bilateral renal agenesis (antenatal ultrasound)",
     "The patient presents with decreased liquor.",
     ["According to the <image>\n, marked regurgitation is seen along the tricuspid valve. According to the "
      "<image>\n, additionally, there is non-visualization of the bilateral kidneys. The ductus venosus is also "
      "absent"]),
    ("181112", ["181112/ct_group1/0.jpeg", "181112/ct_group1/1.jpeg"], "Cardiac lipoma",
     "Incidental finding in patient presenting with acute PE.",
     ["According to the <image>\n<image>\n, there is a right atrial intracardiac mass with the same density as "
      "subcutaneous fat layer, measuring 5.4 x 2.9 cm, suggesting a lipoma."]),
]
DEMO_MODALITY = {"169992": "CT", "159949": "CT", "189353": "X-ray", "190893": "CT", "158377": "X-ray",
                 "178062": "CT", "160688": "Mammography", "177194": "CT", "189817": "Ultrasound", "181112": "CT"}
N_VQA = 13  # a fifth of 13 rounds to 3: InternVL's floor needs 0.3, not 0.2


def _png(path: Path, shade: int, size=(64, 48)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (shade % 256, (shade * 5) % 256, 90)).save(path, format="PNG")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("demo")
    images = root / "images"
    cases, shade = [], 0
    for rid, paths, title, presentation, captions in DEMO:
        for path in paths:
            shade += 1
            _png(images / path, shade)
        cases.append({
            "rid": rid,
            "messages": [{"role": "user", "content": f"**Question:** Case {rid}: what is the most likely diagnosis?"},
                         {"role": "assistant", "content": f"**Correct Answer:** {title}"}],
            "images": paths, "title": title, "certainty": "Diagnosis certain", "presentation": presentation,
            "age_label": "45 years", "gender_label": "Female", "caption": captions,
        })
    (root / "cases.jsonl").write_text("".join(json.dumps(case) + "\n" for case in cases))
    (root / "mics.jsonl").write_text("")
    (root / "text_qa.jsonl").write_text("".join(
        json.dumps({"id": f"{rid}-qa0", "case_id": rid, "question": f"Q {rid}?\nA. a\nB. b", "answer": "A. a"}) + "\n"
        for rid, *_ in DEMO
    ))
    vqa = root / "slake"
    for index in range(N_VQA):
        _png(vqa / "imgs" / f"xmlab{index}" / "source.png", 100 + index)
    (vqa / "train.jsonl").write_text("".join(
        json.dumps({"id": f"s{i}", "question": "Is the lung healthy?", "answer": "yes",
                    "images": [f"imgs/xmlab{i}/source.png"], "modality": ["X-Ray", "CT", "MRI"][i % 3]}) + "\n"
        for i in range(N_VQA)
    ))
    return {"root": root, "cases": root / "cases.jsonl", "images": images, "mics": root / "mics.jsonl",
            "text_qa": root / "text_qa.jsonl", "vqa": vqa / "train.jsonl"}


def build_demo(demo, output: Path, **recipe_changes) -> Path:
    recipe = default_recipe().model_copy(update={"test_fraction": 0.0, **recipe_changes})
    build_dataset(BuildOptions(mics=[demo["mics"]], cases=demo["cases"], image_dir=demo["images"], output=output,
                               recipe=recipe, text_qa=demo["text_qa"], vqa={"slake": demo["vqa"]}, seed=3))
    return output


@pytest.fixture(scope="module")
def built(demo, tmp_path_factory) -> Path:
    return build_demo(demo, tmp_path_factory.mktemp("built") / "curriculum")


# --- alignment prose -----------------------------------------------------------------------------------------

PROSE = [
    # one image: the lead-in goes, with the comma it leaves on the next line
    ("According to the <image>\n, no aortic dissection.\nIncidental anomalous course of the left coronary artery.", 1,
     "No aortic dissection.\nIncidental anomalous course of the left coronary artery."),
    # several placeholders in a row naming every image of the unit: nothing to tell apart
    ("According to the <image>\n<image>\n, anomalous left main coronary artery origin. \u00a0Normal right coronary "
     "artery origin, course and caliber.", 2,
     "Anomalous left main coronary artery origin. Normal right coronary artery origin, course and caliber."),
    # Chiron-o1 lower-cased the word after the comma
    ("According to the <image>\n<image>\n, cT cisternography shows a contrast leak. ", 2,
     "CT cisternography shows a contrast leak."),
    # <br/> is a line break; a cut-off caption still ends as a sentence
    ("According to the <image>\n, no intracranial bleed.<br/>Frontal sulci mildly widened.<br/>Empty sella", 1,
     "No intracranial bleed.\nFrontal sulci mildly widened.\nEmpty sella."),
    # one lead-in per image: "Image k" where it tells the images apart
    ("According to the <image>\n, marked tricuspid regurgitation. According to the <image>\n, additionally, there is "
     "non-visualization of the kidneys.", 2,
     "According to Image 1, marked tricuspid regurgitation. According to Image 2, additionally, there is "
     "non-visualization of the kidneys."),
    ("According to the <image>\n<image>\n, a right atrial mass. According to the <image>\n, a filling defect.", 3,
     "According to Images 1 and 2, a right atrial mass. According to Image 3, a filling defect."),
    # a lead-in in the middle of a report
    ("CORONARY ANATOMY:\n\u00a0Left main: mild plaque. According to the <image>\n, there is bridging of distal LAD.\n"
     "\u00a0\nRV: Normal.\n\n\u00a0", 1,
     "CORONARY ANATOMY:\nLeft main: mild plaque. There is bridging of distal LAD.\nRV: Normal."),
    ("Findings, according to the <image>, include a mass.", 1, "Findings include a mass."),
    # placeholders that are nouns or labels
    ("The <image> shows a mass; the <image> shows none.", 2, "Image 1 shows a mass; Image 2 shows none."),
    ("Seen on the <image> as a dark band.", 1, "Seen on the image as a dark band."),
    ("<image> Axial CT: a 13 mm nodule.", 1, "Axial CT: a 13 mm nodule."),
    ("<image> left; <image> right.", 2, "Image 1: left; Image 2: right."),
    # doubled articles, stray commas, HTML
    ("According to the the <image>\n,  , a mass ,seen in the the left lobe .", 1, "A mass, seen in the left lobe."),
    ("<p>Mass&nbsp;in <b>segment&nbsp;7</b> &amp; 8</p><br>No ascites", 1, "Mass in segment 7 & 8\nNo ascites."),
    ("A mass (<25% of the lobe) and a cyst <5 mm.", 1, "A mass (<25% of the lobe) and a cyst <5 mm."),
]


@pytest.mark.parametrize("caption, count, expected", PROSE)
def test_alignment_targets_are_clean_clinical_prose(caption, count, expected):
    assert clean_caption(caption, count)[0] == expected


def test_caption_cleaning_is_counted_by_kind():
    _, changes = clean_caption("According to the <image>\n, , a mass in the the lobe<br/>y", 1)
    assert changes == Counter({"lead_in_dropped": 1, "html_stripped": 1, "doubled_article": 1,
                               "stray_punctuation": 1})
    assert clean_caption("A normal chest radiograph.", 1) == ("A normal chest radiograph.", Counter())


def test_demo_alignment_targets_carry_no_placeholders_markup_or_doubled_words(built):
    llava = json.loads((built / "stage2" / "llava.json").read_text())
    targets = {entry["conversations"][1]["value"] for entry in llava if entry["id"].split("#")[0].count("-align")}
    assert len(targets) == 10  # one unit per demo case (177194's second caption names no image)
    for target in targets:
        assert "<image>" not in target and "<br" not in target and "According to the" not in target
        assert " ," not in target and not target.startswith(",") and "the the" not in target.lower()
        assert "\u00a0" not in target and target[0].isupper()
    assert "CT cisternography in coronal and axial planes shows a contrast leak through the left cribriform plate " \
           "to the left-sided anterior ethmoidal air cells." in targets
    stats = json.loads((built / "stats.json").read_text())
    assert stats["caption_cleaning"]["units"] == 10
    assert stats["caption_cleaning"]["lead_in_dropped"] == 9 and stats["caption_cleaning"]["images_labelled"] == 1
    assert stats["caption_cleaning"]["html_stripped"] == 1


# --- modality ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("images, expected", [
    (["169992/ct_group1/0.png"], "CT"),
    (["/data/images/189353/x-ray_group1/0.jpeg"], "X-ray"),
    (["160688/mammography_group1/0.png"], "Mammography"),
    (["185438/mri_group1/0.jpeg", "185438/mri_group1/1.jpeg"], "MRI"),
    (["201392/ultrasound_group1/0.jpeg"], "Ultrasound"),
    (["197850/mri_group2/0.jpeg", "197850/x-ray_group1/0.png"], "mixed"),
    (["images\\26514\\mri_group1\\0.jpeg"], "MRI"),
    (["scans/CT/001.png"], "CT"),
    ("images/187899/x-ray_group1/0.jpeg", "X-ray"),  # eval_data.json names a lone image as a string
])
def test_modality_from_chiron_folder_names(images, expected):
    # The folder wins over words in the text ("chest x-ray" in the question of a CT case).
    assert modality_evidence("Based on the chest x-ray findings", images=images) == (expected, "folder")


@pytest.mark.parametrize("case, expected", [
    ({"modality": "X-Ray"}, ("X-ray", "field")),  # SLAKE's spelling
    ({"modality": "ct"}, ("CT", "field")),
    ({"case_info": {"imaging_modality": "Ultrasound"}}, ("Ultrasound", "field")),
    ({"case_info": {"CT": "hypodense lesion", "chief_complaint": "pain"}}, ("CT", "field")),
    ({"title": "Normal CT head"}, ("CT", "title")),
    ({"title": "Tricuspid regurgitation (antenatal ultrasound)"}, ("Ultrasound", "title")),
    ({"title": "Cardiac lipoma"}, ("MRI", "text")),  # nothing in the fields: the text decides
])
def test_modality_from_case_fields_before_the_text(case, expected):
    assert modality_evidence("The MRI shows a mass", images=["123/0.png"], case=case) == expected


@pytest.mark.parametrize("text, expected", [
    ("Axial CT of the chest", "CT"), ("PET/CT shows uptake", "PET"), ("CT angiography of the neck", "CT"),
    ("a mammogram of the left breast", "Mammography"), ("pulse wave Doppler", "Ultrasound"),
    ("Mr Smith has sustained chest pain", "other"), ("spin echo sequence", "other"), ("H&E stain, x40", "Pathology"),
])
def test_modality_words_in_text_are_the_last_resort(text, expected):
    assert detect_modality(text) == expected


def test_demo_modalities_come_from_folders_in_stats_and_eval(built, demo, tmp_path):
    from mics_agents.evaluation.loaders import load_benchmark

    stats = json.loads((built / "stats.json").read_text())
    assert "other" not in stats["stages"]["stage2"]["modality"]
    assert stats["modality"]["by_source"]["part2_alignment"] == dict(sorted(Counter(DEMO_MODALITY.values()).items()))
    assert stats["modality"]["by_source"]["vqa:slake"] == {"CT": 4, "MRI": 4, "X-ray": 5}
    assert stats["modality"]["by_source"]["part1_text_qa"] == {"none": 10}
    # The same detector reads Chiron-o1's eval_data.json layout in mics eval.
    eval_data = [{"id": index, "images": [f"images/{path}" for path in paths], "question": f"Question {rid}?",
                  "answer": "x"} for index, (rid, paths, *_) in enumerate(DEMO)]
    (tmp_path / "eval_data.json").write_text(json.dumps(eval_data))
    modalities = [item.modality for item in load_benchmark(tmp_path / "eval_data.json")]
    assert modalities == [DEMO_MODALITY[rid] for rid, *_ in DEMO]


# --- exports, each read the way its tool reads it --------------------------------------------------------------


def _internvl_read(meta_path: Path) -> list[tuple[str, str, tuple[str, ...]]]:
    """What InternVL's build_datasets/LazySupervisedDataset take from a meta file (internvl_chat_finetune.py):
    ``open(meta['annotation'])`` from the launch folder, ``lines[:int(len * repeat_time)]`` below 1, an
    integer ``repeat_time`` above 1, images at ``os.path.join(meta['root'], image)``."""
    taken = []
    for spec in json.loads(meta_path.read_text()).values():
        assert spec["annotation"].endswith("jsonl") and spec["data_augment"] is False
        with open(spec["annotation"]) as handle:
            lines = handle.readlines()
        assert spec["length"] == len(lines)
        repeat_time = spec["repeat_time"]
        if repeat_time < 1:
            lines = lines[: int(len(lines) * repeat_time)]
        if repeat_time > 1:
            assert isinstance(repeat_time, int)
            lines = lines * repeat_time
        for line in lines:
            item = json.loads(line)
            images = item.get("image", [])
            images = [images] if isinstance(images, str) else images
            paths = tuple(os.path.join(spec["root"], image) for image in images)
            assert all(os.path.isfile(path) for path in paths)
            assert item["conversations"][0]["value"].count("<image>") == len(paths)
            taken.append((item["conversations"][0]["value"], item["conversations"][1]["value"],
                          tuple(os.path.realpath(path) for path in paths)))
    return taken


def _llava_read(folder: Path) -> list[tuple[str, str, tuple[str, ...]]]:
    rows = []
    for entry in json.loads((folder / "llava.json").read_text()):
        images = entry.get("image", [])
        images = [images] if isinstance(images, str) else images
        rows.append((entry["conversations"][0]["value"], entry["conversations"][1]["value"],
                     tuple(os.path.realpath(folder / image) for image in images)))
    return rows


def test_internvl_meta_repeats_by_repeat_time_and_loads_from_any_launch_folder(built, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the stage folder
    for stage in ("stage1", "stage2", "stage3", "test"):
        meta_path = built / stage / "internvl_meta.json"
        meta = json.loads(meta_path.read_text())
        for spec in meta.values():  # the paths resolve from the meta file's folder too
            assert (meta_path.parent / spec["annotation"]).is_file() and (meta_path.parent / spec["root"]).is_dir()
        assert Counter(_internvl_read(meta_path)) == Counter(_llava_read(built / stage)), stage
    stage2 = json.loads((built / "stage2" / "internvl_meta.json").read_text())
    assert {name: spec["repeat_time"] for name, spec in stage2.items()} == {
        "mmrp_stage2_part1_text_qa": 1, "mmrp_stage2_part2_alignment": 10, "mmrp_stage2_vqa-slake": 0.3}
    assert stage2["mmrp_stage2_part2_alignment"]["length"] == 10, "each sample once; InternVL repeats it"
    assert stage2["mmrp_stage2_vqa-slake"]["length"] == N_VQA, "the whole source; InternVL takes the fraction"


def test_a_ratio_above_one_with_a_fraction_takes_two_entries(demo, tmp_path, monkeypatch):
    stages = {"s": {"part2_alignment": 2.5}}
    out = build_demo(demo, tmp_path / "c", stages=stages)
    meta = json.loads((out / "s" / "internvl_meta.json").read_text())
    assert {name: spec["repeat_time"] for name, spec in meta.items()} == {
        "mmrp_s_part2_alignment": 2, "mmrp_s_part2_alignment_part": 0.5}
    monkeypatch.chdir(tmp_path)
    assert Counter(_internvl_read(out / "s" / "internvl_meta.json")) == Counter(_llava_read(out / "s"))


@pytest.mark.parametrize("taken, total, expected", [(2, 10, 0.2), (3, 13, 0.3), (1, 3, 0.4), (29, 100, 0.291),
                                                       (1, 1000, 0.001)])
def test_internvl_repeat_time_is_the_shortest_fraction_its_floor_turns_into_the_count(taken, total, expected):
    assert internvl_repeat_time(taken, total) == expected
    assert all(int(n * internvl_repeat_time(k, n)) == k for n in range(2, 120) for k in range(1, n))


def test_llamafactory_dataset_info_loads_with_its_sharegpt_reader(built):
    """LLaMA-Factory (0.9.x, data/README.md, data/parser.py, data/converter.py): dataset_info.json in
    --dataset_dir names the file, sharegpt formatting, the columns and tags; the file is read with
    datasets.load_dataset("json"); media paths are joined to media_dir, which defaults to dataset_dir."""
    from datasets import load_dataset

    for stage in ("stage1", "stage2", "stage3", "test"):
        dataset_dir = built / stage
        info = json.loads((dataset_dir / "dataset_info.json").read_text())
        [(name, entry)] = info.items()
        assert name == f"mmrp_{stage}" and entry["formatting"] == "sharegpt"
        if not json.loads((dataset_dir / entry["file_name"]).read_text()):
            continue  # the test split is empty here (test_fraction 0)
        columns, tags = entry["columns"], entry["tags"]
        rows = load_dataset("json", data_files=[str(dataset_dir / entry["file_name"])], split="train")
        assert {columns["messages"], columns["images"]} <= set(rows.column_names)
        assert len(rows) == len(json.loads((dataset_dir / "llava.json").read_text()))
        for row in rows:
            turns = row[columns["messages"]]
            assert [turn[tags["role_tag"]] for turn in turns] == [tags["user_tag"], tags["assistant_tag"]]
            images = row[columns["images"]]
            assert turns[0][tags["content_tag"]].count("<image>") == len(images)
            assert all(os.path.isfile(os.path.join(dataset_dir, image)) for image in images)


def test_hf_export_loads_with_load_from_disk(built):
    from datasets import load_from_disk

    hf = load_from_disk(str(built / "stage2" / "hf"))
    rows = [json.loads(line) for line in (built / "stage2" / "messages.jsonl").read_text().splitlines()]
    assert len(hf) == len(rows) and hf[0]["messages"][1]["role"] == "assistant"
    with_images = next(row for row in hf if row["images"])
    assert with_images["images"][0].size == (64, 48)


def test_each_hf_folder_is_its_messages_rows_with_the_image_bytes_embedded(built):
    """hf/ is read back from messages.jsonl (memory flat in the stage's size): the same rows in the same order,
    an image part's missing text a None, and each image the bytes of the file the row names."""
    from datasets import Image, List, load_from_disk

    for name in ("stage1", "stage2", "stage3", "test"):
        folder = built / name
        rows = [json.loads(line) for line in (folder / "messages.jsonl").read_text().splitlines()]
        hf = load_from_disk(str(folder / "hf")).cast_column("images", List(Image(decode=False)))
        assert len(hf) == len(rows)
        for loaded, row in zip(hf, rows):
            assert {key: loaded[key] for key in ("id", "case_id", "source")} == \
                {key: row[key] for key in ("id", "case_id", "source")}
            assert loaded["messages"] == [
                {**message, "content": [{"text": None, **part} for part in message["content"]]}
                for message in row["messages"]
            ]
            assert [(image["path"], image["bytes"]) for image in loaded["images"]] == \
                [(Path(image).name, (folder / image).read_bytes()) for image in row["images"]]
        assert not list(folder.glob(".*")) and not list((folder / "hf").glob(".*")), "no temporary file left"
    assert any(rows for rows in (load_from_disk(str(built / name / "hf")) for name in ("stage2", "stage3")))


def test_a_moved_curriculum_is_relocated_for_internvl(built, tmp_path, monkeypatch):
    moved = tmp_path / "elsewhere" / "curriculum"
    shutil.copytree(built, moved)
    metas = [path for path in moved.glob("*/internvl_meta.json") if json.loads(path.read_text())]
    assert len(metas) == 3 and all(str(built) in path.read_text() for path in metas)
    from mics_agents.dataset.exports import _main

    assert _main(["relocate", str(moved)]) == 0
    monkeypatch.chdir(tmp_path)
    for meta_path in metas:
        assert str(built) not in meta_path.read_text()
        assert Counter(_internvl_read(meta_path)) == Counter(_llava_read(moved / meta_path.parent.name))
    relocate_internvl_meta(moved / "stage1" / "internvl_meta.json")  # idempotent


def test_messages_rows_name_several_images_as_the_llava_turn_and_the_alignment_targets_do(built):
    """messages.jsonl (what training/ reads, and hf/ with it) labels each of several images "Image-k" where it
    stands, so a target that says "Image 2" points at a known image; one image stays unlabelled."""
    from training.data import read_stage_file

    for stage in ("stage2", "stage3"):
        rows = [json.loads(line) for line in (built / stage / "messages.jsonl").read_text().splitlines()]
        llava = {entry["id"]: entry["conversations"][0]["value"]
                 for entry in json.loads((built / stage / "llava.json").read_text())}
        several = [row for row in rows if len(row["images"]) > 1]
        assert several and any(len(row["images"]) == 1 for row in rows)
        for row in rows:
            content = row["messages"][0]["content"]
            rendered = "".join("<image>" if part["type"] == "image" else part["text"] for part in content)
            expected = llava[row["id"]].replace("<image>\n", "<image>", 1) if len(row["images"]) == 1 else llava[row["id"]]
            assert rendered == expected, row["id"]
        for row in several:
            content = row["messages"][0]["content"]
            labels = [part["text"] for part in content if part["type"] == "text"][:-1]
            assert labels == ["Image-1: ", *(f"\nImage-{k}: " for k in range(2, len(row["images"]) + 1))]
        targets = [row for row in several if "Image 2" in row["messages"][1]["content"][0]["text"]]
        assert targets, "an alignment target names Image 2 of a unit whose user turn labels it"
        assert len(read_stage_file(built / stage / "messages.jsonl", stage=stage).samples) == len(rows)


# --- stages and samples held lightly ---------------------------------------------------------------------------


def _stage_as_lists(stage: str, stage_sources: dict[str, float], train: list, seed: int) -> list:
    """How stages were assembled when each copy was a sample in a list: what curriculum.Stage must equal."""
    import math
    import random

    from mics_agents.dataset.curriculum import source_weight
    from mics_agents.dataset.samples import Sample

    def copy(sample, index):
        if index == 0:
            return sample
        return Sample(sample.id + f"#{index}", sample.case_id, sample.source, sample.prompt, sample.response,
                      list(sample.images), sample.modality)

    by_source: dict[str, list] = {}
    for sample in train:
        by_source.setdefault(sample.source, []).append(sample)
    chosen = []
    for source in sorted(by_source):
        ratio = source_weight(source, stage_sources)
        if ratio:
            rng = random.Random(f"{seed}:{stage}:{source}")
            copies = math.floor(ratio)
            for index in range(copies):
                chosen.extend(copy(sample, index) for sample in by_source[source])
            remainder = round((ratio - copies) * len(by_source[source]))
            if remainder:
                chosen.extend(copy(sample, copies) for sample in rng.sample(by_source[source], remainder))
    random.Random(f"{seed}:{stage}:order").shuffle(chosen)
    return chosen


@pytest.mark.parametrize("count", [1, 7, 40, 300])
def test_a_stage_of_pool_places_reads_as_the_list_of_copies_it_replaced(count, tmp_path):
    from mics_agents.dataset.curriculum import assemble_stage
    from mics_agents.dataset.samples import PART1, PART2, PART3, Sample, TextSpill

    sources = [PART1, PART2, PART3, "vqa:rad", "vqa:path"]
    with TextSpill(tmp_path) as spill:
        train = [Sample(f"s{n}", f"c{n % 9}", sources[n % 5], f"prompt {n} é\u2028", f"response {n}\n\ud800",
                        [tmp_path / f"{n}.png"], "CT").spill(spill) for n in range(count)]
        for recipe in ({"vqa": 0.2, PART1: 1.0, PART2: 10.0}, {"vqa:rad": 2.5, "vqa": 0.3, PART3: 1.0, PART2: 0.55}):
            for seed in (0, 5):
                stage = assemble_stage("stage2", recipe, train, seed)
                expected = _stage_as_lists("stage2", recipe, train, seed)
                assert len(stage) == len(expected) and list(stage) == expected
                if expected:
                    assert stage[-1] == expected[-1] and stage[1:3] == expected[1:3]


def test_spilled_texts_read_back_whole_and_copies_share_them(tmp_path):
    from mics_agents.dataset.samples import Sample, TextSpill

    texts = [("", ""), ("é \u2028 \x00 \ud83d\ude00", "line\nbreak"), ("lone \udc80 surrogate", "x" * 100_000)]
    with TextSpill(tmp_path) as spill:
        samples = [Sample(f"s{n}", "c", "part", prompt, response) for n, (prompt, response) in enumerate(texts)]
        for sample in samples:
            sample.spill(spill)
        spill.put("written after", "a read")  # reads and writes interleave
        copied = samples[1].copy("s1#1")
        assert [(sample.prompt, sample.response) for sample in samples] == texts
        assert (copied.id, copied.texts) == ("s1#1", texts[1]) and copied._texts is samples[1]._texts
        assert copied.images is not samples[1].images
    assert not list(tmp_path.iterdir()), "the spill file is anonymous"
