"""The config's `chat_template` key, as mergekit reads it: a built-in name, `auto`, or the template itself.

- `chatml` / `llama3`: the ChatML and Llama 3 chat formats, written here;
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
