"""Merge methods: pure tensor functions and the registry that names them.

A method never does I/O, device placement or config parsing. It declares how it takes its inputs and
which parameters it has (global and per model, with defaults), and the engine, the search and the
config validation all read that one declaration.

    inputs="deltas":  fn(base, deltas, *, weights, <params>)   task vectors τ_i = θ_i − θ_base
    inputs="models":  fn(tensors, *, <per-model params>, ...)   whole weights (base included if given); a
                      per-model `weight` arrives as `weights`, every per-model parameter as a list
    inputs="pair":    fn(a, b, *, t)                            two models, a is the base
    inputs="stock":   fn(base, tensors)                         base plus the other models' weights
    inputs="base_optional":  fn(base or None, others, *, weights, ...)  the base optional (nuslerp, multislerp)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from safemerge.errors import ConfigError, did_you_mean

REQUIRED = object()  # default marker for a parameter that must be given


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[..., Any]
    inputs: Literal["deltas", "models", "pair", "stock", "base_optional"]
    global_params: dict[str, Any] = field(default_factory=dict)
    model_params: dict[str, Any] = field(default_factory=dict)
    elementwise: bool = False  # output element j depends on input elements j only: may run in row chunks
    random: bool = False  # takes a `generator` (seeded per tensor by the engine)
    scale_free: bool = False  # scaling every weight by one factor changes nothing, whatever `normalize` says
    max_models: int | None = None  # the most models it merges (passthrough: 1)
    others: int | None = None  # exactly this many models besides the base (nuslerp: 2)

    @property
    def needs_base(self) -> bool:
        return self.inputs in ("deltas", "pair", "stock")


METHODS: dict[str, MethodSpec] = {}


def register(name: str, **spec: Any) -> Callable[[Callable], Callable]:
    """Decorator that records `fn` under `name` with its declaration; it returns `fn` unchanged."""

    def deco(fn: Callable) -> Callable:
        METHODS[name] = MethodSpec(name=name, fn=fn, **spec)
        return fn

    return deco


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ConfigError(f"merge_method {name!r} is unknown{did_you_mean(name, METHODS, n=3)} "
                          f"(known: {', '.join(sorted(METHODS))})")
    return METHODS[name]


# importing the modules fills METHODS
from safemerge.methods import fusion, linear, ram, slerp, stock, task_arithmetic  # noqa: E402,F401
from safemerge.methods.fusion import arcee_fusion  # noqa: E402
from safemerge.methods.linear import linear as linear_merge, nearswap, passthrough  # noqa: E402
from safemerge.methods.ram import ram as ram_merge, ramplus_tl  # noqa: E402
from safemerge.methods.slerp import karcher, multislerp, nuslerp, slerp as slerp_merge  # noqa: E402
from safemerge.methods.stock import model_stock  # noqa: E402
from safemerge.methods.task_arithmetic import (  # noqa: E402
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    sce,
    task_arithmetic as task_arithmetic_merge,
    ties,
)

__all__ = [
    "METHODS", "MethodSpec", "REQUIRED", "register", "get_method", "linear_merge", "slerp_merge",
    "model_stock", "task_arithmetic_merge", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "sce", "nuslerp", "passthrough", "nearswap", "multislerp", "karcher", "arcee_fusion",
    "ram_merge", "ramplus_tl",
]
