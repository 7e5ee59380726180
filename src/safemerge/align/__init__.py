"""Preference-alignment baselines: DPO and ORPO with LoRA (through TRL), merged into a plain checkpoint.

`align(model, data=..., method="dpo" | "orpo", out=...)` is the paper's baseline for MergeAlign: the
domain expert made safer by preference tuning instead of by merging. See docs/align.md.
"""

from safemerge.align.data import PreferenceDataError, as_chat, hh_to_messages, load_preferences, split_hh
from safemerge.align.run import align, load_run
from safemerge.align.settings import METHODS, AlignSettings

__all__ = ["align", "load_run", "load_preferences", "split_hh", "hh_to_messages", "as_chat", "AlignSettings",
           "METHODS", "PreferenceDataError"]
