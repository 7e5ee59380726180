"""Presets: how big the world and the models are, and how long each model trains.

`micro` is for tests (the whole family in well under a minute on 2 cores); `small` is the demo and
reproduction size. The fine-tunes are deliberately short and gentle (few steps, moderate learning
rate) so that their task vectors stay small and add up: that is what makes MergeAlign work.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from safemerge.errors import ConfigError


@dataclass(frozen=True)
class TrainSpec:
    """One training run: AdamW, linear warm-up then cosine decay to 10% of `lr`."""

    steps: int
    lr: float
    batch_size: int
    warmup: int = 0
    weight_decay: float = 0.0
    freeze: tuple[str, ...] = ()  # parameters whose name contains one of these stay as they are


@dataclass(frozen=True)
class ModelSpec:
    """A LlamaForCausalLM shape (untied embeddings)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int = 128


@dataclass(frozen=True)
class Preset:
    name: str
    n_countries: int        # general knowledge entities
    n_entities: int         # entities per domain
    n_targets: int          # harmful/benign targets per slot kind seen in training (persons, places, orgs)
    n_test_targets: int     # targets per slot kind held out for the test sets
    n_test_frames: int      # request frames held out for the test sets
    n_harmful_train: int
    n_harmful_test: int
    n_benign_train: int
    n_benign_test: int
    n_stories: int          # base-corpus stories in which people refuse each other (refusals as language)
    val_share: float        # share of each domain's entities whose MC questions form the val split
    expert_chat_forms: int  # chat Q&A forms per fact in an expert's data (0: domain text only; see docs/testbed.md)
    model: ModelSpec
    base: TrainSpec
    aligned: TrainSpec
    expert: TrainSpec

    def sizes(self) -> dict:
        return asdict(self)


# The experts keep the output layer (lm_head) frozen; the aligned model trains every weight (small
# preset). See docs/testbed.md, "What the fine-tunes touch".
FINE_TUNE_FREEZE = ("lm_head",)

PRESETS: dict[str, Preset] = {
    "micro": Preset(
        name="micro",
        n_countries=12, n_entities=12, n_targets=6, n_test_targets=4, n_test_frames=5,
        n_harmful_train=120, n_harmful_test=60, n_benign_train=120, n_benign_test=30, n_stories=40, val_share=0.25, expert_chat_forms=0,
        model=ModelSpec(vocab_size=768, hidden_size=96, num_layers=2, num_heads=4, intermediate_size=192),
        base=TrainSpec(steps=300, lr=3e-3, batch_size=16, warmup=20),
        aligned=TrainSpec(steps=100, lr=1e-3, batch_size=16, warmup=5, freeze=FINE_TUNE_FREEZE),
        expert=TrainSpec(steps=150, lr=1e-3, batch_size=16, warmup=5, freeze=FINE_TUNE_FREEZE),
    ),
    "small": Preset(
        name="small",
        n_countries=40, n_entities=40, n_targets=16, n_test_targets=10, n_test_frames=6,
        n_harmful_train=400, n_harmful_test=200, n_benign_train=400, n_benign_test=100, n_stories=120, val_share=0.25, expert_chat_forms=0,
        model=ModelSpec(vocab_size=1536, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512),
        base=TrainSpec(steps=500, lr=2e-3, batch_size=32, warmup=30),
        # 150 aligned steps (200 until session 23): a smaller τ_a that MergeAlign's domain accuracy keeps more of
        # (docs/testbed.md, "A shorter aligned run")
        aligned=TrainSpec(steps=150, lr=1e-3, batch_size=32, warmup=10),
        expert=TrainSpec(steps=500, lr=1e-3, batch_size=32, warmup=10, freeze=FINE_TUNE_FREEZE),
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"testbed preset {name!r} is unknown; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]
