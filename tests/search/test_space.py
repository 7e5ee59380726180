"""The search space comes from the method's declaration; its points become ordinary merge configs."""

from __future__ import annotations

import pytest

from safemerge.errors import ConfigError
from safemerge.methods import get_method
from safemerge.search import SearchSpace

from conftest import task_config

FAMILY = {"base": "/m/base", "expert": "/m/expert", "aligned": "/m/aligned"}


def test_dimensions_follow_the_declared_parameters():
    ties = SearchSpace(task_config(FAMILY, "ties", weight=0.7, density=0.4))
    assert ties.labels == ["expert.weight", "expert.density", "aligned.weight", "aligned.density"]
    assert ties.start() == {"expert.weight": 0.7, "expert.density": 0.4, "aligned.weight": 0.7, "aligned.density": 0.4}
    assert (ties.lower, ties.upper) == ([0, 0.1, 0, 0.1], [1, 1, 1, 1])
    ta = SearchSpace(task_config(FAMILY))
    assert ta.labels == ["expert.weight", "aligned.weight"]
    assert "density" not in get_method("task_arithmetic").model_params  # the reason, from the registry
    slerp = SearchSpace({"merge_method": "slerp", "base_model": "/m/base", "models": [{"model": "/m/base"}, {"model": "/m/expert"}],
                         "parameters": {"t": 0.3}})
    assert slerp.labels == ["t"] and slerp.start() == {"t": 0.3}


def test_missing_density_starts_at_its_declared_default():
    cfg = task_config(FAMILY, "dare_ties")
    assert SearchSpace(cfg).start()["expert.density"] == get_method("dare_ties").model_params["density"] == 1.0


def test_a_point_becomes_a_config_with_everything_else_kept():
    cfg = {**task_config(FAMILY, "ties", density=0.5), "dtype": "bfloat16", "parameters": {"lambda": 0.9}}
    space = SearchSpace(cfg)
    point = space.point([0.2, 0.3, 1.7, 0.0])  # clipped into the box
    assert point == {"expert.weight": 0.2, "expert.density": 0.3, "aligned.weight": 1.0, "aligned.density": 0.1}
    out = space.to_config(point)
    assert [m.parameters for m in out.models] == [{"weight": 0.2, "density": 0.3}, {"weight": 1.0, "density": 0.1}]
    assert out.parameters == {"lambda": 0.9} and out.dtype == "bfloat16" and out.base_model == "/m/base"


def test_unsearchable_method_and_gradient_start_are_errors():
    with pytest.raises(ConfigError, match="no weight, density or t to search"):
        SearchSpace({"merge_method": "model_stock", "base_model": "/m/base",
                     "models": [{"model": "/m/expert"}, {"model": "/m/aligned"}]})
    with pytest.raises(ConfigError, match="give a single number"):
        SearchSpace(task_config(FAMILY, weight=[0.1, 0.9]))
