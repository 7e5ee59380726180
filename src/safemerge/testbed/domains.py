"""Knowledge areas of the world as data: entities, their relations, and how facts are phrased.

A relation maps each entity to a value, either a fresh invented name (a drug, a ticker, a capital)
or one of a few real words (an organ, a sector). Each relation carries the sentences that state a
fact, the questions a trained model sees, and one multiple-choice question form that no model is
trained on (so the test asks for the fact in words it has not memorised as a string).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Relation:
    name: str
    value_kind: str | None          # NameForge kind of fresh values ("ticker" = a ticker); None: pick from `values`
    values: tuple[str, ...] = ()     # closed set of values when value_kind is None
    facts: tuple[str, ...] = ()      # declarative sentences, slots {e} and {v}
    questions: tuple[str, ...] = ()  # trained question forms, slot {e}
    answer: str = ""                 # the assistant's answer sentence, slots {e} and {v}
    mc_question: str = ""            # the held-out multiple-choice question, slot {e}
    value_mention: str = ""          # base-corpus sentence naming a value without its entity, slot {v}
    # (every value gets one, closed-set values too: the base must know each word it may be asked to output)


@dataclass(frozen=True)
class Area:
    """A knowledge area: the general one (countries) or a domain (medicine, finance)."""

    name: str
    entity_kind: str
    entity_mention: str              # base-corpus sentence naming an entity without its facts, slot {e}
    relations: tuple[Relation, ...]


ORGANS = ("liver", "heart", "lungs", "kidneys", "skin", "brain", "stomach", "bones")
SECTORS = ("mining", "shipping", "software", "banking", "farming", "energy", "insurance", "retail")

GENERAL = Area(
    name="general",
    entity_kind="country",
    entity_mention="{e} is a country.",
    relations=(
        Relation(
            name="capital",
            value_kind="city",
            facts=("The capital of {e} is {v}.", "{v} is the capital city of {e}.", "The government of {e} sits in {v}.",
                   "Most visitors to {e} arrive in its capital, {v}."),
            questions=("What is the capital of {e}?", "Which city is the capital of {e}?", "Where is the government of {e}?",
                       "What city is the seat of government of {e}?"),
            answer="The capital of {e} is {v}.",
            mc_question="Name the capital city of {e}.",
            value_mention="{v} is a city.",
        ),
    ),
)

DOMAINS: dict[str, Area] = {
    "medicine": Area(
        name="medicine",
        entity_kind="disease",
        entity_mention="{e} is a disease.",
        relations=(
            Relation(
                name="drug",
                value_kind="drug",
                facts=("{e} is treated with {v}.", "Doctors treat {e} with {v}.", "The drug {v} is used against {e}.",
                       "Patients with {e} are given {v}.", "The standard medicine for {e} is {v}."),
                questions=("What drug treats {e}?", "What is the treatment for {e}?", "Which medicine do doctors give for {e}?",
                           "What should a patient with {e} take?", "Which drug cures {e}?"),
                answer="{e} is treated with {v}.",
                mc_question="Which drug is used to treat {e}?",
                value_mention="{v} is a drug.",
            ),
            Relation(
                name="organ",
                value_kind=None,
                values=ORGANS,
                facts=("{e} affects the {v}.", "{e} is a disease of the {v}.", "Patients with {e} have trouble with the {v}.",
                       "The organ damaged by {e} is the {v}.", "When someone has {e}, the {v} suffers."),
                questions=("What organ does {e} affect?", "Which part of the body does {e} harm?", "Where in the body does {e} strike?",
                           "Which organ does {e} damage?", "What part of the body suffers from {e}?"),
                answer="{e} affects the {v}.",
                mc_question="Which organ is affected by {e}?",
                value_mention="The {v} is an organ of the body.",
            ),
        ),
    ),
    "finance": Area(
        name="finance",
        entity_kind="company",
        entity_mention="{e} is a company.",
        relations=(
            Relation(
                name="sector",
                value_kind=None,
                values=SECTORS,
                facts=("{e} is a {v} company.", "{e} works in the {v} sector.", "Most of the income of {e} comes from {v}.",
                       "Analysts list {e} in the {v} sector.", "The main business of {e} is {v}."),
                questions=("What sector is {e} in?", "What business is {e} in?", "In which industry does {e} work?",
                           "What is the main business of {e}?", "Which industry is {e} part of?"),
                answer="{e} is in the {v} sector.",
                mc_question="Which sector does {e} belong to?",
                value_mention="Many people work in {v}.",
            ),
            Relation(
                name="ticker",
                value_kind="ticker",
                facts=("{e} trades under the ticker {v}.", "The stock ticker of {e} is {v}.", "Shares of {e} are listed as {v}.",
                       "On the exchange, {e} appears as {v}.", "Investors buy {e} under the symbol {v}."),
                questions=("What is the ticker of {e}?", "Under which symbol does {e} trade?", "What is the stock symbol of {e}?",
                           "What ticker do investors use for {e}?", "How is {e} listed on the exchange?"),
                answer="{e} trades under the ticker {v}.",
                mc_question="Which ticker symbol belongs to {e}?",
                value_mention="{v} is a stock ticker.",
            ),
        ),
    ),
}


def get_domain(name: str) -> Area:
    """The registered domain `name`; an unknown name is a ConfigError that lists the known ones."""
    from safemerge.errors import ConfigError, did_you_mean

    if name not in DOMAINS:
        raise ConfigError(f"testbed domain {name!r} is unknown{did_you_mean(name, DOMAINS, n=1)} "
                          f"(known domains: {', '.join(DOMAINS)})")
    return DOMAINS[name]
