"""The search space: which numbers of a merge config a search may change, and back into a config.

The dimensions come from the method's own declaration (`safemerge.methods.METHODS`), never from a
second table: every searched model gets its declared per-model `weight` and `density` (when the
method declares them), and a declared global `t` (SLERP) is one dimension. What this module adds is
only the range each of those three parameter kinds may take:

    weight  ∈ [0, 1]      the mixing weight of a model (task vector or whole weights)
    density ∈ [0.1, 1]    the kept share of a task vector (TIES trim, DARE drop); 0 would keep nothing;
                          DELLA: [ε + 0.01, 1 − ε − 0.01] within that, since density ± ε must lie inside (0, 1)
    t       ∈ [0, 1]      the SLERP interpolation position (0 = base)

Other declared parameters (lambda, normalize, gamma, ...) stay as the config sets them.
A point of the space is a `dict[str, float]` keyed by labels such as `expert-medicine.weight`,
`aligned.density` or `t`, in `SearchSpace.labels` order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from safemerge.config import MergeConfig, load_config
from safemerge.errors import ConfigError
from safemerge.methods import REQUIRED, get_method
from safemerge.naming import display_names

RANGES: dict[str, tuple[float, float]] = {"weight": (0.0, 1.0), "density": (0.1, 1.0), "t": (0.0, 1.0)}


@dataclass(frozen=True)
class Dim:
    """One searched number: `param` of `model` (a config model path), or a global one when model is None."""

    label: str
    param: str
    model: str | None
    low: float
    high: float
    start: float


class SearchSpace:
    """The box [low, high]^n of a config's searchable parameters, and the map from its points to configs."""

    def __init__(self, config: MergeConfig | Mapping | str, *, ranges: Mapping[str, tuple[float, float]] = RANGES):
        self.config = load_config(config).require_whole_models("the search")
        self.spec = get_method(self.config.merge_method)
        self.models = [m.model for m in self.config.weighted_models()]
        names = display_names(self.models)
        dims: list[Dim] = []
        for model, short in zip(self.models, names):
            for param in ("weight", "density"):
                if param in self.spec.model_params:
                    low, high = ranges[param]
                    if param == "density" and "epsilon" in self.spec.model_params:
                        low, high = self._della_band(model, low, high)
                    start = self._start(param, model, self.spec.model_params[param], low, high)
                    dims.append(Dim(f"{short}.{param}", param, model, low, high, start))
        if "t" in self.spec.global_params:
            low, high = ranges["t"]
            dims.append(Dim("t", "t", None, low, high, self._start("t", None, self.spec.global_params["t"], low, high)))
        if not dims:
            raise ConfigError(f"merge_method {self.config.merge_method} has no weight, density or t to search; "
                              "choose a method such as task_arithmetic, ties, dare_ties or slerp")
        self.dims = dims

    @property
    def labels(self) -> list[str]:
        return [d.label for d in self.dims]

    @property
    def lower(self) -> list[float]:
        return [d.low for d in self.dims]

    @property
    def upper(self) -> list[float]:
        return [d.high for d in self.dims]

    def start(self) -> dict[str, float]:
        """The config's own values (clipped into the box): the search's starting point."""
        return {d.label: d.start for d in self.dims}

    def point(self, x) -> dict[str, float]:
        """A vector (any float sequence, in `labels` order) as a labelled point, clipped into the box."""
        if len(x) != len(self.dims):
            raise ValueError(f"a point of this space has {len(self.dims)} numbers ({', '.join(self.labels)}), got {len(x)}")
        return {d.label: min(d.high, max(d.low, float(v))) for d, v in zip(self.dims, x)}

    def to_config(self, point: Mapping[str, float]) -> MergeConfig:
        """The ordinary merge config with the point's numbers written in (other keys kept)."""
        data = self.config.to_yaml_dict()
        by_model: dict[str, dict[str, float]] = {}
        for d in self.dims:
            if d.label not in point:
                raise KeyError(f"point has no value for {d.label!r}")
            if d.model is None:
                data.setdefault("parameters", {})[d.param] = float(point[d.label])
            else:
                by_model.setdefault(d.model, {})[d.param] = float(point[d.label])
        for m in data["models"]:
            if m["model"] in by_model:
                m["parameters"] = {**m.get("parameters", {}), **by_model[m["model"]]}
        return load_config(data)

    # -- internals ----------------------------------------------------------------------------------
    def _della_band(self, model: str, low: float, high: float) -> tuple[float, float]:
        """DELLA needs density ± epsilon inside (0, 1): the density range shrinks to [ε + 0.01, 1 − ε − 0.01]."""
        eps = self._start("epsilon", model, self.spec.model_params["epsilon"], 0.0, 1.0)
        low, high = max(low, eps + 0.01), min(high, 1.0 - eps - 0.01)
        if high - low < 1e-9:  # an empty band, or one point: cma needs room between its bounds
            raise ConfigError(f"models[{model}]: epsilon {eps:g} leaves no density to search (density ± epsilon must lie "
                              "inside (0, 1)); lower epsilon")
        return low, high

    def _start(self, param: str, model: str | None, default, low: float, high: float) -> float:
        value = None
        if model is not None:
            entry = next(m for m in self.config.models if m.model == model)
            value = entry.parameters.get(param)
        if value is None:
            value = self.config.parameters.get(param)
        if value is None:
            value = default
        if value is REQUIRED or value is None:
            return (low + high) / 2
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            where = f"models[{model}].parameters.{param}" if model else f"parameters.{param}"
            raise ConfigError(f"{where}: the search starts from scalar values, but this is {value!r}; "
                              "give a single number (layer gradients and filters are not searched)")
        return min(high, max(low, float(value)))

