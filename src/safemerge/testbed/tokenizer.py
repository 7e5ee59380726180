"""A small byte-level BPE tokenizer trained on the world's text, with a chat template.

The template is the simplest one a real instruct model could have:
`<|user|>{prompt}<|end|><|assistant|>{answer}<|end|>`; `<|end|>` is also the EOS token, so
generation stops at the end of the assistant's turn. There is no BOS token: plain text starts at its
first token, as lm-evaluation-harness feeds it by default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

PAD, END, USER, ASSISTANT, SYSTEM = "<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"
SPECIAL_TOKENS = [PAD, END, USER, ASSISTANT, SYSTEM]

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}<|user|>{{ message['content'] }}<|end|>"
    "{%- elif message['role'] == 'assistant' -%}<|assistant|>{{ message['content'] }}<|end|>"
    "{%- elif message['role'] == 'system' -%}<|system|>{{ message['content'] }}<|end|>"
    "{%- else -%}{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def user_turn(prompt: str) -> str:
    """The rendered context of a one-turn chat with the generation prompt (what the template gives)."""
    return f"{USER}{prompt}{END}{ASSISTANT}"


def train_tokenizer(texts: Iterable[str], *, vocab_size: int):
    """Train byte-level BPE on `texts` and wrap it as a transformers fast tokenizer.

    Byte-level: any string round-trips (decode(encode(s)) == s). Deterministic for the same texts.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=END,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json, the chat template inside the latter.

    `save_jinja_files=False` keeps the template in tokenizer_config.json (the format older readers
    and most tools expect) rather than a separate chat_template.jinja.
    """
    import json

    tokenizer.save_pretrained(str(out_dir), save_jinja_files=False)
    # transformers 5 names its own class; the generic name loads the same tokenizer.json in 4.x too.
    cfg_file = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
