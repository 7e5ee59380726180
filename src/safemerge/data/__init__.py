"""Datasets for evaluation: harmful prompts (BeaverTails, HH-RLHF red-team, plain files) and
multiple-choice domain questions.

Every loader returns plain Python records plus a *data fingerprint* (a content hash of the file and
the loading options) that the results store uses as part of its key. The search area adds
`safemerge.data.synthetic` (synthetic safety and domain data) beside these loaders.
"""

from safemerge.data.loaders import (
    MCQuestion,
    Prompt,
    PromptSet,
    QuestionSet,
    load_multiple_choice,
    load_prompts,
)

__all__ = ["MCQuestion", "Prompt", "PromptSet", "QuestionSet", "load_multiple_choice", "load_prompts"]
