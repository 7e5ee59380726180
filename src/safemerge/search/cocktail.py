"""LM-Cocktail: a linear merge of whole weights, each model weighted by how well it fits a few examples.

Xiao et al. (2023), "LM-Cocktail: Resilient Tuning of Language Models via Model Merging":

    w_i = softmax_i(−L_i / T),      θ = Σ_i w_i · θ_i

where L_i is model i's loss on the example data and T the temperature. Here L_i is the search
objective λ·CE(safety) + (1−λ)·CE(domain), so λ = 0 is LM-Cocktail on domain data only and λ > 0
the safety-aware variant of Hammoud et al. (2024). The models are the config's `models` (the base
too when it is listed there). T defaults to 1.0, the value the safety paper ran; LM-Cocktail's own
default is 5.0 (flatter weights for the same losses).

The scored candidates are each model alone (a linear config with weight 1 on it and 0 on the
others, which is that model's weights exactly) and then the mixture; the mixture is the result.
"""

from __future__ import annotations

import math
from pathlib import Path

from safemerge.config import MergeConfig, load_config, same_model
from safemerge.errors import ConfigError, SafemergeError
from safemerge.search.evaluations import Candidate, Evaluations
from safemerge.search.objective import Score

DEFAULT_TEMPERATURE = 1.0


def softmax_weights(losses: list[float], temperature: float) -> list[float]:
    """softmax(−loss/T), computed stably (shifted by the smallest loss)."""
    if temperature <= 0:
        raise ConfigError(f"temperature {temperature} must be positive")
    if not all(math.isfinite(x) for x in losses):
        raise SafemergeError(f"LM-Cocktail needs a finite loss for every model, got {losses}")
    low = min(losses)
    e = [math.exp(-(x - low) / temperature) for x in losses]
    total = sum(e)
    return [v / total for v in e]


def linear_config(config: MergeConfig, weights: list[float]) -> MergeConfig:
    """The config's models merged linearly with `weights` (normalised); the other keys are kept. A base model
    that is not one of the models is listed with weight 0 (a linear merge takes the base in as one more model,
    as in mergekit; LM-Cocktail mixes the models only)."""
    data = config.to_yaml_dict()
    data["merge_method"] = "linear"
    data["parameters"] = {"normalize": True}
    data["models"] = [{"model": m.model, "parameters": {"weight": float(w)}} for m, w in zip(config.models, weights)]
    if config.base_model and not any(same_model(config.base_model, m.model) for m in config.models):
        data["models"].append({"model": config.base_model, "parameters": {"weight": 0.0}})
    return load_config(data)


def labels(config: MergeConfig) -> list[str]:
    short = [Path(m.model).name or m.model for m in config.models]
    names = short if len(set(short)) == len(short) else [m.model for m in config.models]
    return [f"{n}.weight" for n in names]


def check_cocktail_pool(config: MergeConfig) -> None:
    if len(config.models) < 2:
        raise ConfigError("LM-Cocktail mixes at least two models; list them under `models`")


def cocktail_members(config: MergeConfig) -> list[str]:
    """The models the mixture takes in: the config's `models` (its base too where it is listed there, not otherwise)."""
    return list(dict.fromkeys(m.model for m in config.models))


def cocktail(config: MergeConfig, evaluate: Evaluations, *, temperature: float = DEFAULT_TEMPERATURE) -> tuple[int, Candidate, Score]:
    """Score each model, weight them by softmax(−L/T), score the mixture; return the mixture."""
    check_cocktail_pool(config)
    names = labels(config)
    n = len(names)
    alone = []
    for i in range(n):
        onehot = [1.0 if j == i else 0.0 for j in range(n)]
        alone.append(Candidate(dict(zip(names, onehot)), linear_config(config, onehot)))
    losses = [s.objective for s in evaluate(alone)]
    weights = softmax_weights(losses, temperature)
    mixture = Candidate(dict(zip(names, weights)), linear_config(config, weights))
    (score,) = evaluate([mixture])
    return evaluate.next - 1, mixture, score
