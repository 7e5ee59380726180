"""The config's `chat_template` key, as mergekit reads it: a built-in name, `auto`, or the template itself.

- `chatml`, `llama3`, `alpaca`, `mistral`, `exaone`: those chat formats (mergekit 0.1.5's built-in names),
  written here;
- `auto`: the template most of the input models carry (the first of them on a tie), else none;
- any other string containing `{` is a Jinja template, checked to compile;
- anything else is an error (a name would otherwise be stored as the template text, and every
  conversation would render as that word).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable

BUILT_IN = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "alpaca": (  # mergekit's turns: the last system message first, then "### Instruction:" (user), "### Input:"
        # (user_context) and "### Response:" (assistant) blocks; each response ends with eos_token, as models trained
        # on this format end them (mergekit's does not), and blocks are separated by one blank line
        "{% set systems = messages | selectattr('role', 'equalto', 'system') | list %}"
        "{% if systems %}{{ systems[-1]['content'] | trim + '\\n\\n' }}{% endif %}"
        "{% set heads = {'user': '### Instruction:', 'user_context': '### Input:', 'assistant': '### Response:'} %}"
        "{% for message in messages if message['role'] in heads %}"
        "{{ ('' if loop.first else '\\n\\n') + heads[message['role']] + '\\n' + message['content'] | trim }}"
        "{{ eos_token if message['role'] == 'assistant' else '' }}"
        "{% endfor %}"
        "{% if add_generation_prompt and messages and messages[-1]['role'] != 'assistant' %}"
        "{{ '\\n\\n### Response:\\n' }}{% endif %}"
    ),
    "mistral": (  # [INST] ... [/INST] turns; a system message goes before the first user turn's text
        "{{ bos_token }}"
        "{% set system = messages[0]['content'] | trim if messages and messages[0]['role'] == 'system' else '' %}"
        "{% for message in messages if message['role'] != 'system' %}"
        "{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + (system + '\\n\\n' if loop.first and system else '') + message['content'] | trim + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] | trim + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "exaone": (  # [|role|] turns, each but the user's closed by [|endofturn|]; an empty system turn when none is given
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
        "{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{{ '\\n' if message['role'] == 'user' else '[|endofturn|]\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}


def check(value: str) -> str:
    """The config value, or ValueError saying what a chat_template may be."""
    if value == "auto" or value in BUILT_IN:
        return value
    if "{" not in value:
        raise ValueError(f"chat_template {value!r} is neither a built-in template ({', '.join(sorted(BUILT_IN))}), "
                         "'auto' (the input models' own), nor a Jinja template")
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().from_string(value)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat_template is not a valid Jinja template (line {e.lineno}: {e.message})") from None
    return value


def resolve(value: str | None, models: Iterable[Path]) -> str | None:
    """The template text to write into the output, or None to keep the tokenizer source's own."""
    if value is None:
        return None
    if value == "auto":
        from safemerge.evaluate.loading import chat_template_text

        found = [t.strip() for t in (chat_template_text(Path(m)) for m in models) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    return BUILT_IN.get(value, value)
