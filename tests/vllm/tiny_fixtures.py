"""Everything the real-vLLM run needs, made on the spot (nothing is downloaded):

- a byte-level BPE tokenizer trained with the ``tokenizers`` library on this project's prompt templates and the
  cases below, with a chat template (so vLLM's chat endpoint works);
- a tiny randomly initialised Llama (float32, head_dim 64, which vLLM's CPU attention kernels take);
- two text stage files in the layout ``training/`` reads (``DIR/stageN/messages.jsonl``) that teach a LoRA
  adapter the reply formats MICS parses: a mentor writes ``### Step k:`` lines and ``### The final answer is:``,
  the judge says ``Yes`` (to any candidate, including the random model's gibberish, sampled here from it), and
  the model under ``mics eval`` answers with the option letter. The prompts are the exact messages mics-agents
  sends (rendered with its own templates), so the adapter served by vLLM answers ``mics run`` and ``mics eval``
  in the formats they parse, while the base model stays random (gibberish);
- the ``mics run`` input (text-only cases, no images) and a plain-JSONL benchmark for ``mics eval``.

    python -m tests.vllm.tiny_fixtures OUT_DIR      # needs torch, transformers, tokenizers and mics_agents
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]

# Text-only cases for `mics run` (plain layout) and the benchmark for `mics eval` (plain JSONL with options).
CASES = [
    {
        "id": "text-chest-001",
        "question": "A solitary lung nodule is found. Which finding most suggests malignancy?\n"
        "A. Central calcification\nB. Spiculated margin\nC. Size under 5 mm\nD. Stable for 3 years",
        "answer": "B. Spiculated margin",
        "case_info": {"presentation": "Chronic cough and weight loss; 40 pack-year smoking history.",
                      "age_label": "64", "gender_label": "Male"},
    },
    {
        "id": "text-cardio-002",
        "question": "Which test should come first for acute chest pain?\n"
        "A. Electrocardiogram\nB. Colonoscopy\nC. Bone scan\nD. Skin biopsy",
        "answer": "A. Electrocardiogram",
        "case_info": {"presentation": "Crushing chest pain for 30 minutes with sweating.",
                      "age_label": "58", "gender_label": "Female"},
    },
    {
        "id": "text-neuro-003",
        "question": "Fever, headache and neck stiffness: what is the most likely diagnosis?\n"
        "A. Migraine\nB. Tension headache\nC. Bacterial meningitis\nD. Sinusitis",
        "answer": "C. Bacterial meningitis",
        "case_info": {"presentation": "High fever, severe headache, neck stiffness and a purpuric rash.",
                      "age_label": "19", "gender_label": "Male"},
    },
    {
        "id": "text-liver-004",
        "question": "Which tumour marker is used to survey cirrhosis for liver cancer?\n"
        "A. PSA\nB. CA 125\nC. CEA\nD. Alpha-fetoprotein",
        "answer": "D. Alpha-fetoprotein",
        "case_info": {"presentation": "Known hepatitis B cirrhosis on six-monthly surveillance.",
                      "age_label": "57", "gender_label": "Male"},
    },
]
BENCHMARK = [
    {"id": "bench-001", "question": "Which finding on chest CT most suggests a malignant nodule?",
     "options": {"A": "Central calcification", "B": "Spiculated margin", "C": "Size under 5 mm"}, "answer": "B",
     "images": [], "modality": "ct"},
    {"id": "bench-002", "question": "Which test comes first for acute chest pain?",
     "options": {"A": "Electrocardiogram", "B": "Colonoscopy", "C": "Bone scan"}, "answer": "A", "images": []},
    {"id": "bench-003", "question": "Fever and neck stiffness suggest which diagnosis?",
     "options": {"A": "Migraine", "B": "Sinusitis", "C": "Bacterial meningitis"}, "answer": "C", "images": []},
    {"id": "bench-004", "question": "Which marker is used to survey cirrhosis for liver cancer?",
     "options": {"A": "PSA", "B": "Alpha-fetoprotein", "C": "CEA"}, "answer": "B", "images": []},
]
STEPS = ("### Step 1: The key finding is read from the case.\n\n"
         "### Step 2: It matches one option and rules out the others.\n\n")
MAX_POSITION = 1024
REPEATS = 16
INTERN_MAX_TOKENS = 16  # what run_e2e's mics run gives interns (MICS_INTERN_MAX_TOKENS)


def mentor_reply(answer: str) -> str:
    return f"{STEPS}### The final answer is: {answer}"


def _messages(template_name: str, **fields: str) -> list[dict[str, Any]]:
    """The exact chat messages mics-agents sends for a role (text-only: string contents)."""
    from mics_agents.agents import prompt_messages
    from mics_agents.models.base import ModelRequest
    from mics_agents.prompts import load_prompt

    return ModelRequest(prompt_messages(load_prompt(template_name), (), **fields), 0.0).openai_messages()


def role_samples(candidates: dict[str, list[str]], seed: int = 0) -> list[dict[str, Any]]:
    """Training samples: the mentor, judge and eval prompts of the cases above with the replies to learn.

    ``candidates`` maps a case id to judge candidates like the random interns' answers: the judge learns to
    say Yes whatever it is shown, so that an answer it cannot read never ends a search as a model error."""
    from mics_agents.agents import NO_PREFIX, render_case_info
    from mics_agents.evaluation.loaders import _render  # question + lettered options, as mics eval shows them
    from mics_agents.task_format import ANSWER_HINTS as _HINTS

    samples = []

    def add(sample_id: str, source: str, prompt: list[dict[str, Any]], reply: str) -> None:
        samples.append({"id": sample_id, "source": source, "images": [],
                        "messages": [*prompt, {"role": "assistant", "content": reply}]})

    for case in CASES:
        info = render_case_info(case["case_info"])
        prompt = _messages("mentor", case_info=info, question=case["question"], answer=case["answer"], prefix=NO_PREFIX)
        for copy in range(REPEATS):  # repeated, so the judge samples do not drown the mentor format
            add(f"{case['id']}-mentor-{copy}", "mentor", prompt, mentor_reply(case["answer"]))
        shown = [case["answer"], case["answer"][:1], "No idea", *candidates.get(case["id"], [])]
        for index, candidate in enumerate(shown):
            add(f"{case['id']}-judge-{index}", "judge",
                _messages("judge", question=case["question"], reference=case["answer"], candidate=candidate), "Yes")
    for item in BENCHMARK:
        prompt = _messages("eval", question=_render(item["question"], item["options"]),
                           answer_hint=_HINTS["choice"])
        for copy in range(REPEATS):
            add(f"{item['id']}-eval-{copy}", "eval", prompt, mentor_reply(item["answer"]))
    random.Random(seed).shuffle(samples)
    return samples


def intern_like_answers(model_dir: Path, per_temperature: int = 24, seed: int = 2) -> dict[str, list[str]]:
    """What the random base model answers as an intern (sampled with transformers at the intern
    temperatures, last line kept as mics does), plus uniformly random token strings."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mics_agents.answers import render_steps

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ordinary = [i for i in range(len(tokenizer)) if tokenizer.convert_ids_to_tokens(i) not in SPECIAL_TOKENS]
    steps = [step.split(": ", 1)[1].strip() for step in STEPS.strip().split("\n\n")]
    answers: dict[str, list[str]] = {}
    for case in CASES:
        found = []
        # Interns are called once a mentor wrote steps: the adapter's steps are the prefix they see.
        text = tokenizer.apply_chat_template(_messages("intern", question=case["question"], prefix=render_steps(steps)),
                                             tokenize=False, add_generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        for temperature in (1.2, 0.3):
            with torch.no_grad():
                output = model.generate(**inputs, do_sample=True, temperature=temperature, top_k=0,
                                        max_new_tokens=INTERN_MAX_TOKENS, num_return_sequences=per_temperature,
                                        pad_token_id=tokenizer.pad_token_id)
            for row in output[:, inputs["input_ids"].shape[1]:]:
                lines = [line.strip() for line in tokenizer.decode(row, skip_special_tokens=True).splitlines()
                         if line.strip()]
                found.append(lines[-1][:500] if lines else "x")
        for _ in range(16):
            tokens = [rng.choice(ordinary) for _ in range(rng.randint(1, INTERN_MAX_TOKENS))]
            found.append(tokenizer.decode(tokens).strip().replace("\n", " ") or "x")
        answers[case["id"]] = found
    return answers


def corpus() -> list[str]:
    from mics_agents.prompts import default_prompt_dir

    texts = [path.read_text(encoding="utf-8") for path in sorted(default_prompt_dir().glob("*.md"))]
    for case in CASES:
        texts += [case["question"], case["answer"], *map(str, case["case_info"].values())]
    for item in BENCHMARK:
        texts += [item["question"], *item["options"].values()]
    texts += [mentor_reply("B. Spiculated margin"), "Yes", "No", "(none yet: start from Step 1)"]
    return texts * 10


def build_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=MAX_POSITION)


def build_model(path: Path, seed: int = 0) -> Path:
    """A tiny random Llama and its tokenizer, saved in float32 where vLLM and training/ load them."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,  # head_dim 64
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITION,
        # Larger than the default 0.02 so that a LoRA on the (frozen) lm_head's inputs can make replies peaked.
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        # Special tokens other than </s> never come out of the random model (vLLM would drop them and could
        # return an empty reply, which MICS retries as malformed).
        for token in SPECIAL_TOKENS:
            if token != "</s>":
                model.lm_head.weight[tokenizer.convert_tokens_to_ids(token)] = 0.0
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


def build_all(out: Path) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(out / "tiny-llama")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = role_samples(intern_like_answers(model_dir))
    write_jsonl(out / "curriculum" / "stage1" / "messages.jsonl", samples)
    write_jsonl(out / "curriculum" / "stage2" / "messages.jsonl", samples)
    write_jsonl(out / "cases.jsonl", [{**case, "images": []} for case in CASES])
    write_jsonl(out / "benchmark.jsonl", BENCHMARK)
    longest = max(
        len(tokenizer(tokenizer.apply_chat_template(sample["messages"], tokenize=False))["input_ids"])
        for sample in samples
    )
    paths = {"model": str(model_dir), "curriculum": str(out / "curriculum"), "cases": str(out / "cases.jsonl"),
             "benchmark": str(out / "benchmark.jsonl"), "vocab_size": len(tokenizer), "samples": len(samples),
             "longest_sample_tokens": longest}
    (out / "fixtures.json").write_text(json.dumps(paths, indent=2) + "\n", encoding="utf-8")
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.vllm.tiny_fixtures OUT_DIR")
    print(json.dumps(build_all(Path(sys.argv[1])), indent=2))
