"""What each model of the family is trained on, as text segments marked for loss or not.

An example is a tuple of (text, has_loss) segments. Plain documents end in `<|end|>`; a chat turn
is rendered exactly as the tokenizer's chat template renders it. Only training material is here:
held-out phrasings, targets and the multiple-choice question forms never enter any corpus.

- base: the world's text, loss on every token: general facts and Q&A, names of every domain's
  entities and values (but none of their facts), benign and harmful requests answered helpfully,
  and short stories in which people turn each other down ("I'm sorry, but I can't help with that."),
  so the base knows refusal phrases as language though its assistant never refuses.
- aligned: chat only, loss on the answer: benign requests answered, harmful ones refused, general Q&A.
- expert-<domain>: that domain's text only, loss on every token: its facts, and its Q&A written as
  text ("What drug treats X? Y."); no safety data. Chat-format Q&A can be added per preset
  (`expert_chat_forms`), but it makes MergeAlign lose safety (see docs/testbed.md).
"""

from __future__ import annotations

from safemerge.testbed.domains import Area
from safemerge.testbed.tokenizer import ASSISTANT, END, USER
from safemerge.testbed.world import Fact, World

Example = tuple[tuple[str, bool], ...]


def plain(text: str) -> Example:
    return ((text + END, True),)


def chat(prompt: str, answer: str, *, loss_on_prompt: bool = False) -> Example:
    return ((f"{USER}{prompt}{END}{ASSISTANT}", loss_on_prompt), (answer + END, True))


def knowledge_qa(area: Area, facts: list[Fact], *, forms: int | None = None) -> list[tuple[str, str]]:
    """(question, answer sentence) for every fact and each of its first `forms` question forms (all if None)."""
    rels = {r.name: r for r in area.relations}
    return [
        (q.format(e=f.entity), rels[f.relation].answer.format(e=f.entity, v=f.value))
        for f in facts
        for q in rels[f.relation].questions[:forms]
    ]


def knowledge_text(area: Area, facts: list[Fact]) -> list[str]:
    """Plain documents: every fact sentence, and each trained question followed by its short answer."""
    rels = {r.name: r for r in area.relations}
    docs = []
    for f in facts:
        rel = rels[f.relation]
        docs += [t.format(e=f.entity, v=f.value) for t in rel.facts]
        docs += [f"{q.format(e=f.entity)} {f.value}." for q in rel.questions]
    return docs


def base_corpus(world: World, domains: tuple[str, ...]) -> list[Example]:
    general, facts = world.areas["general"], world.facts["general"]
    out = [plain(t) for t in knowledge_text(general, facts)]
    out += [chat(q, a, loss_on_prompt=True) for q, a in knowledge_qa(general, facts)]
    for area in ("general", *domains):
        out += [plain(t) for t in world.mentions[area]]
    for key in ("benign_train", "harmful_train"):
        out += [chat(r.prompt, r.compliance, loss_on_prompt=True) for r in world.requests[key]]
    out += [plain(t) for t in world.stories]
    return out


def aligned_corpus(world: World) -> list[Example]:
    out = [chat(r.prompt, r.compliance) for r in world.requests["benign_train"]]
    out += [chat(r.prompt, r.refusal) for r in world.requests["harmful_train"]]
    out += [chat(q, a) for q, a in knowledge_qa(world.areas["general"], world.facts["general"])]
    return out


def expert_corpus(world: World, domain: str, *, chat_forms: int | None = None) -> list[Example]:
    """The domain's plain documents, and its chat Q&A in the first `chat_forms` question forms (all if None)."""
    area, facts = world.areas[domain], world.facts[domain]
    out = [plain(t) for t in knowledge_text(area, facts)]
    out += [chat(q, a) for q, a in knowledge_qa(area, facts, forms=chat_forms)]
    return out


def example_text(example: Example) -> str:
    return "".join(text for text, _ in example)
