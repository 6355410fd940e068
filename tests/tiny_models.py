"""Tiny randomly initialised models and curricula for the training tests, made on the spot (nothing downloaded).

- a byte-level BPE tokenizer trained with the ``tokenizers`` library on the curriculum's own words, with a
  chat template that renders ``{"type": "image"}`` parts as ``<image>``;
- a tiny LLaVA (CLIP vision tower 16x16 pixels in 8x8 patches -> 4 image tokens, a 2-layer Llama) with the
  slow CLIP image processor (no torchvision needed);
- the paper's family: a tiny InternVL in the "-hf" layout (``InternVLForConditionalGeneration``: InternViT tiles of
  16x16 pixels, 4 tokens per tile after the pixel shuffle, a 2-layer Qwen2), and a tiny Qwen2.5-VL (4-pixel patches
  merged 2x2, so 64 pixels per image token), each with its model's chat template and special tokens. Their
  processors need torchvision (``has_torchvision()``);
- a tiny Llama causal LM for text-only stages;
- stage files in the dataset builder's layout: ``DIR/stageN/messages.jsonl`` with images relative to the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>", "<|user|>", "<|assistant|>", "<|system|>"]
IMAGE_SIZE = 16
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "grey": (128, 128, 128)}

# Question, answer: short and repeated, so a few steps at a high learning rate make the loss fall reliably.
TEXT_QA = [
    ("Which finding most suggests malignancy? A. calcification B. spiculated margin", "The final answer is: B"),
    ("What is the first step for chest pain?", "Step 1: get an ECG. The final answer is: ECG"),
]
CAPTIONS = {
    "red": "The image shows a red lesion.",
    "green": "The image shows a green organ.",
    "blue": "The image shows a blue vessel.",
    "grey": "The image shows a grey mass.",
}
COT = "Step 1: look at the image. Step 2: compare the colour. The final answer is: {answer}"


def corpus() -> list[str]:
    texts = [q for q, _ in TEXT_QA] + [a for _, a in TEXT_QA] + list(CAPTIONS.values())
    texts += [COT.format(answer=colour) for colour in COLOURS]
    texts += ["Describe the image.", "What colour is the finding?", "Compare the two images."]
    return texts * 20


def build_tokenizer(
    extra_texts: list[str] = (),
    *,
    special_tokens: list[str] = SPECIAL_TOKENS,
    chat_template: str = CHAT_TEMPLATE,
    **tokens: Any,
) -> Any:
    """A byte-level BPE tokenizer trained on the spot; ``tokens`` name its bos/eos/pad and extra special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400 if not extra_texts else 1000,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus() + list(extra_texts), trainer)
    if not tokens:
        tokens = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=chat_template, **tokens)


def has_torchvision() -> bool:
    """The InternVL and Qwen2.5-VL processors need torchvision, and a torchvision built for the installed torch."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # not installed, or built for another torch ("operator torchvision::nms does not exist")
        return False
    return True


def _text_config(tokenizer: Any, model_type: str = "llama", **extra: Any) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        # Larger than the default 0.02, so logits are not flat at the start and a few LoRA steps lower the loss.
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def build_tiny_vlm(path: Path, seed: int = 0, extra_texts: list[str] = ()) -> Path:
    """Save a tiny LLaVA and its processor to ``path``; AutoModelForImageTextToText/AutoProcessor load it.

    ``extra_texts`` join the tokenizer's training corpus (so other data tokenizes into few tokens)."""
    import torch
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(extra_texts)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=8,
        projection_dim=16,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=_text_config(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


# InternVL3's "-hf" chat template (as transformers' conversion script writes it): ChatML, each image an <IMG_CONTEXT>
# line that the processor expands to <img> + 4 tokens per tile + </img>.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
INTERNVL_TILE = 16  # pixels per tile side (448 in InternVL3)
CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_internvl(path: Path, seed: int = 0, extra_texts: list[str] = (), max_tiles: int = 12) -> Path:
    """Save a tiny InternVL ("-hf" layout, ``InternVLForConditionalGeneration``) and its processor to ``path``.

    The image processor tiles like InternVL's (``max_patches``, default 12 as InternVL3 ships it; a thumbnail is
    added when there is more than one tile); each 16x16 tile is 16 patches of 4x4, 4 tokens after the pixel shuffle.
    """
    import torch
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
        InternVLVisionConfig,
    )

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(
        extra_texts,
        special_tokens=[*CHATML_TOKENS, "<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
        chat_template=INTERNVL_CHAT_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    tile = {"height": INTERNVL_TILE, "width": INTERNVL_TILE}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=tile, crop_to_patches=True, max_patches=max_tiles),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size=tile),
        image_seq_length=4,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    vision = InternVLVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=[INTERNVL_TILE, INTERNVL_TILE],
        patch_size=[4, 4],
    )
    config = InternVLConfig(
        vision_config=vision,
        text_config=_text_config(tokenizer, "qwen2"),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=4,
        downsample_ratio=0.5,
    )
    model = InternVLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_tiny_qwen2_5_vl(path: Path, seed: int = 0, extra_texts: list[str] = ()) -> Path:
    """Save a tiny Qwen2.5-VL and its processor (Qwen2.5-VL's own chat template, as TRL ships it) to ``path``.

    Images are resized to between 64 and 1024 pixels (min_pixels/max_pixels), cut in 4x4 patches merged 2x2:
    one image token per 64 pixels.
    """
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )
    from trl.chat_template_utils import qwen2_5_vl_chat_template

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(
        extra_texts,
        special_tokens=[*CHATML_TOKENS, "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
        chat_template=qwen2_5_vl_chat_template,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    patches = dict(patch_size=4, merge_size=2, temporal_patch_size=2)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=64, max_pixels=1024, **patches),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**patches),
        chat_template=qwen2_5_vl_chat_template,
    )
    text = _text_config(
        tokenizer, "qwen2_5_vl_text", rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2]}
    )
    vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=text.hidden_size,
        window_size=8,
        fullatt_block_indexes=[0],
    )
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=text.to_dict(),
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


FAMILIES = {"llava": build_tiny_vlm, "internvl": build_tiny_internvl, "qwen2_5_vl": build_tiny_qwen2_5_vl}


def build_tiny_causal_lm(path: Path, seed: int = 0) -> Path:
    """Save a tiny Llama causal LM and its tokenizer to ``path``."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = LlamaForCausalLM(_text_config(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_image(path: Path, colour: str) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (IMAGE_SIZE + 4, IMAGE_SIZE + 8), COLOURS[colour]).save(path)


def sample(
    sample_id: str, source: str, question: str, answer: str, images: list[str], case_id: str | None = None
) -> dict[str, Any]:
    return {
        "id": sample_id,
        "case_id": case_id or sample_id.split("-")[0],
        "source": source,
        "images": images,
        "messages": [
            {"role": "user", "content": [*({"type": "image"} for _ in images), {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
    }


def write_stage(folder: Path, samples: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "messages.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in samples), encoding="utf-8")
    return path


def build_curriculum(root: Path, *, with_images: bool = True) -> Path:
    """A curriculum folder as the dataset builder writes it: stage1 (text QA + alignment), stage2 (alignment +
    CoT), stage3 (CoT over one or two images), test; images under ``root/images`` and ``stage*/images``."""
    for colour in COLOURS:
        write_image(root / "images" / f"{colour}.png", colour)
    text = [sample(f"q{i}-text", "part1_text_qa", q, a, []) for i, (q, a) in enumerate(TEXT_QA)]
    if not with_images:
        for stage in ("stage1", "stage2", "stage3", "test"):
            write_stage(root / stage, text)
        return root
    alignment = [
        sample(
            f"c{colour}-align", "part2_alignment", "Describe the image.", CAPTIONS[colour], [f"../images/{colour}.png"]
        )
        for colour in ("red", "green")
    ]
    for colour in ("blue", "grey"):
        write_image(root / "stage3" / "images" / f"{colour}.png", colour)
    cot = [
        sample(
            f"c{colour}-cot",
            "part3_cot",
            "What colour is the finding?",
            COT.format(answer=colour),
            [f"../images/{colour}.png"],
        )
        for colour in ("red", "green")
    ]
    two_images = [
        sample(
            f"c{colour}-cot2",
            "part3_cot",
            "Compare the two images.",
            COT.format(answer=colour),
            ["images/blue.png", f"images/{colour}.png"],
        )
        for colour in ("blue", "grey")
    ]
    write_stage(root / "stage1", text + alignment)
    write_stage(root / "stage2", alignment + cot)
    write_stage(root / "stage3", cot + two_images)
    write_stage(root / "test", cot[:1])
    return root


# --- step preference pairs (steps/pairs.jsonl beside the curriculum) ------------------------------------------------

STEPS = {
    "look": "### Step 1: look at the image.",
    "compare": "### Step 2: compare the colour.",
    "wrong": "### Step 2: the image shows a blue vessel.",
    "red": "### Step 1: The image shows a red lesion.",
    "grey": "### Step 1: The image shows a grey mass.",
}


def step_pair(
    case_id: str,
    question: str,
    images: list[str],
    path: list[str],
    chosen: str,
    rejected: str,
    *,
    depth: int | None = None,
    scores: tuple[float, float] = (1.0, 0.25),
) -> dict[str, Any]:
    """One row of ``steps/pairs.jsonl`` in TRL's conversational preference layout; ``path``: the steps so far."""
    prompt: list[dict[str, Any]] = [
        {"role": "user", "content": [*({"type": "image"} for _ in images), {"type": "text", "text": question}]}
    ]
    if path:
        prompt.append({"role": "assistant", "content": [{"type": "text", "text": "\n\n".join(path)}]})
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
        "images": images,
        "case_id": case_id,
        "rid": case_id,
        "depth": depth if depth is not None else len(path) + 1,
        "chosen_score": scores[0],
        "rejected_score": scores[1],
        "chosen_mentor": "mentor-a",
        "rejected_mentor": "mentor-b",
        "grader_version": 3,
        "source": "mics_tree",
    }


def build_step_pairs(root: Path) -> Path:
    """``root/steps/pairs.jsonl`` for a curriculum made by :func:`build_curriculum`: depth-1 and depth-2 pairs, with
    one and two images, images relative to the file (``../images``)."""
    for colour in COLOURS:
        if not (root / "images" / f"{colour}.png").is_file():
            write_image(root / "images" / f"{colour}.png", colour)
    question, compare = "What colour is the finding?", "Compare the two images."
    rows = [
        step_pair("cred", question, ["../images/red.png"], [], STEPS["red"], STEPS["grey"]),
        step_pair("cred", question, ["../images/red.png"], [STEPS["look"]], STEPS["compare"], STEPS["wrong"]),
        step_pair("cgrey", question, ["../images/grey.png"], [], STEPS["grey"], STEPS["red"], scores=(0.75, 0.0)),
        step_pair(
            "cboth", compare, ["../images/blue.png", "../images/green.png"], [STEPS["look"]], STEPS["compare"],
            STEPS["wrong"],
        ),
    ]
    return write_pairs(root / "steps", rows)


def write_pairs(folder: Path, rows: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path
