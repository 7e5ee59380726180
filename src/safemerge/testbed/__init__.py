"""The testbed: a seeded synthetic world and a tiny model family trained from it on the CPU.

`build_testbed(out, seed=0, preset="small")` writes OUT/base, OUT/aligned, OUT/expert-<domain>
(HF LlamaForCausalLM checkpoints with a trained tokenizer and chat template), OUT/data/*.jsonl and
OUT/world.json. See docs/testbed.md.
"""

from safemerge.testbed.build import build_testbed
from safemerge.testbed.presets import PRESETS

__all__ = ["build_testbed", "PRESETS"]
