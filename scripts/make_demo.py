"""Writes configs/demo/prompts.parquet (the demo job's dataset) and the demo model's chat template.

The demo model is a copy of tests/fixtures/models/llama-tiny (random weights, so completions
are gibberish: the demo shows the pipeline, not the model). Run from the repository root.
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

TOPICS = [
    "the moon", "a lighthouse", "bread", "rivers", "an old clock", "bees", "the desert", "snow",
    "a library", "trains", "copper", "the ocean", "mountains", "a garden", "thunder", "glass",
]


def main() -> None:
    cfg_path = DEMO / "model" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")

    ids, prompts, messages, max_tokens, topics = [], [], [], [], []
    for i in range(50):
        topic = TOPICS[i % len(TOPICS)]
        ids.append(f"demo-{i:03d}")
        topics.append(topic)
        if i % 5 == 4:  # every fifth row is a chat row
            prompts.append(None)
            messages.append([
                {"role": "system", "content": "You answer in one sentence."},
                {"role": "user", "content": f"Tell me something about {topic}."},
            ])
        else:
            prompts.append(f"Write a short line about {topic}:")
            messages.append(None)
        max_tokens.append(24 if i % 7 == 0 else None)  # a per-row override on some rows
    msg_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    table = pa.table({
        "id": pa.array(ids, pa.string()),
        "prompt": pa.array(prompts, pa.string()),
        "messages": pa.array(messages, msg_type),
        "max_tokens": pa.array(max_tokens, pa.int64()),
        "topic": pa.array(topics, pa.string()),
    })
    pq.write_table(table, DEMO / "prompts.parquet", row_group_size=16)


if __name__ == "__main__":
    main()
