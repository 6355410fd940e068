"""Details of the published code that its paper does not state, each a setting with the published behaviour
or ours as default (README, fidelity table): the opening sentence of every path, where mentors' images go,
the exact final-answer line, and the interns' image budget."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from mics_agents.agents import NO_PREFIX
from mics_agents.models import FunctionModel, ImagePart, TextPart

from .scripted import ANSWER, CASE_INFO, QUESTION, intern, judge, mentor, searcher, section, settings

OPENING = "Let us work through this case one step at a time."


async def run(search, **kwargs):
    return await search.search(QUESTION, answer=ANSWER, case_info=CASE_INFO, rid="case-1", **kwargs)


async def test_without_an_opening_paths_start_at_step_1():
    config = settings()
    a, b = mentor("m/a", {0: ["look [score=1.0]", "conclude"]}), mentor("m/b", {0: ["x [score=0.5]", "y"]})
    i = intern("i/1", config)
    result = await run(searcher([a, b], [i], config=config))
    assert result.reasoning.startswith("### Step 1: look")
    assert section(a.requests[0], "Reasoning so far") == NO_PREFIX
    assert section(i.requests[0], "Reasoning so far").startswith("### Step 1:")


async def test_an_opening_heads_what_mentors_and_interns_see_and_the_saved_reasoning():
    config = settings(path_opening=OPENING)
    a = mentor("m/a", {0: ["look [score=0.5]", "think"], 2: ["conclude [score=1.0]"]})
    b = mentor("m/b", {0: ["x [score=0.25]", "y"], 2: ["z [score=0]"]})
    i = intern("i/1", config)
    result = await run(searcher([a, b], [i], config=config))
    assert result.status == "success" and result.final_depth == 2
    # The first mentor call sees the opening alone, as the published root step; later ones the opening, then steps.
    assert section(a.requests[0], "Reasoning so far") == OPENING
    later = section(b.requests[1], "Reasoning so far")
    assert later.startswith(OPENING + "\n\n### Step 1: look")
    assert all(section(r, "Reasoning so far").startswith(OPENING + "\n\n### Step 1:") for r in i.requests)
    # Kept at the head of the saved reasoning (which the dataset builder trains on), the steps after it.
    assert result.reasoning.startswith(OPENING + "\n\n### Step 1: look")
    assert result.reasoning.endswith(f"### The final answer is: {ANSWER}")
    # Never mistaken for a step: the path and the tree hold the mentors' steps only.
    assert [node.steps for node in result.tree if node.selected][0][0] == "look [score=0.5]"


async def test_the_vanilla_arm_starts_its_reasoning_with_the_opening_too():
    config = settings(path_opening=OPENING, strategy="vanilla")
    a = mentor("m/a", {0: ["look [score=1.0]", "conclude"]})
    result = await run(searcher([a], [intern("i/1", config)], config=config))
    assert section(a.requests[0], "Reasoning so far") == OPENING
    assert result.reasoning.startswith(OPENING + "\n\n### Step 1: look")


def png(size) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (90, 90, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def kinds(request) -> list[str]:
    return ["image" if isinstance(part, ImagePart) else "text" for part in request.messages[-1].parts]


@pytest.mark.parametrize("images_first, mentor_order", [(True, ["image", "image", "text"]),
                                                         (False, ["text", "image", "image"])])
async def test_mentors_get_images_before_or_after_the_text_as_set_interns_always_before(images_first, mentor_order):
    config = settings(mentor_images_first=images_first)
    a, b = mentor("m/a", {0: ["look [score=1.0]", "c"]}), mentor("m/b", {0: ["x [score=0.5]", "y"]})
    i = intern("i/1", config)
    result = await run(searcher([a, b], [i], config=config), images=[png((64, 64)), png((80, 60))])
    assert result.status == "success"
    assert kinds(a.requests[0]) == kinds(b.requests[0]) == mentor_order
    assert all(kinds(request) == ["image", "image", "text"] for request in i.requests)


async def test_a_text_first_mentor_request_is_another_cache_entry():
    requests = []
    for images_first in (True, False):
        config = settings(mentor_images_first=images_first)
        a, b = mentor("m/a", {0: ["look [score=1.0]", "c"]}), mentor("m/b", {0: ["x [score=0.5]", "y"]})
        await run(searcher([a, b], [intern("i/1", config)], config=config), images=png((64, 64)))
        requests.append(a.requests[0])
    assert requests[0].cache_key("m/a") != requests[1].cache_key("m/a")


def loose_intern(name: str) -> FunctionModel:
    """Right every time, but writes the answer line in bold without the hashes."""
    return FunctionModel(name, lambda request: f"**The final answer is:** {ANSWER}")


@pytest.mark.parametrize("line, score, judged_by", [("loose", 1.0, "exact"), ("exact", 0.0, "unparsed")])
async def test_a_loosely_written_answer_line_counts_unless_the_exact_published_line_is_asked(line, score, judged_by):
    config = settings(intern_answer_line=line)
    a, b = mentor("m/a", {0: ["look", "c"]}), mentor("m/b", {0: ["x", "y"]})
    judge_model = judge()
    result = await run(searcher([a, b], [loose_intern("i/1")], judge_model, config=config))
    samples = [sample for node in result.tree for sample in node.samples]
    assert samples and all(sample.judged_by == judged_by for sample in samples)
    assert all(sample.format_ok is (line == "loose") for sample in samples)
    assert result.tree[0].score == score
    if line == "exact":
        assert result.status == "no_path"


async def test_the_exact_line_still_takes_the_published_marker():
    config = settings(intern_answer_line="exact")
    a, b = mentor("m/a", {0: ["look [score=1.0]", "c"]}), mentor("m/b", {0: ["x [score=0.5]", "y"]})
    result = await run(searcher([a, b], [intern("i/1", config)], config=config))
    assert result.status == "success" and result.mics_score == 1.0


def sizes(requests) -> set[tuple[int, int]]:
    return {Image.open(io.BytesIO(part.data)).size for request in requests for part in request.messages[-1].images()}


@pytest.mark.parametrize(
    "original, budget, intern_pixels",
    [((1600, 1200), {}, (900_000, 1_003_520)),                      # published maximum: 1280*28*28
     ((120, 90), {}, (120 * 90, 120 * 90)),                         # small: sent as it is (the server enlarges)
     ((120, 90), {"intern_image_min_pixels": 256 * 28 * 28}, (200_704, 220_000)),  # the published minimum, asked
     ((1600, 1200), {"intern_image_max_pixels": 0, "intern_image_min_pixels": 0}, (1536 * 1152, 1536 * 1152)),
     ((120, 90), {"intern_image_max_pixels": 0, "intern_image_min_pixels": 0}, (120 * 90, 120 * 90))],
)
async def test_interns_get_images_within_their_pixel_budget_and_mentors_at_512(original, budget, intern_pixels):
    config = settings(**budget)
    a, b = mentor("m/a", {0: ["look [score=1.0]", "c"]}), mentor("m/b", {0: ["x [score=0.5]", "y"]})
    i = intern("i/1", config)
    result = await run(searcher([a, b], [i], config=config), images=png(original))
    assert result.status == "success"
    [(width, height)] = sizes(i.requests)
    assert intern_pixels[0] <= width * height <= intern_pixels[1]
    mentor_side = min(512, max(original))
    assert {max(size) for size in sizes(a.requests)} == {mentor_side}


async def test_the_intern_budget_does_not_change_an_item_s_made_up_id():
    images = png((2000, 1500))
    with_budget = searcher([mentor("m/a", {}), mentor("m/b", {})], [intern("i/1", settings())])
    without = searcher([mentor("m/a", {}), mentor("m/b", {})], [intern("i/1", settings())],
                       intern_image_max_pixels=0, intern_image_min_pixels=0)
    first = await with_budget.prepare_case(QUESTION, images, answer=ANSWER)
    second = await without.prepare_case(QUESTION, images, answer=ANSWER)
    assert first.rid == second.rid and first.images[0].data != second.images[0].data
    assert first.mentor_images[0].data == second.mentor_images[0].data
