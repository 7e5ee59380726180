"""merge_tensor never modifies its inputs: the in-memory search passes the pool's held tensors straight in."""

from __future__ import annotations

import pytest
import torch

from safemerge.config import load_config
from safemerge.engine import merge_tensor
from safemerge.methods import METHODS

PARAMS = {"weight": 0.7, "density": 0.6, "gamma": 0.05}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inputs_are_left_as_they_were(method, dtype):
    spec = METHODS[method]
    names = ["a", "b"] if spec.inputs == "pair" else ["a", "b", "c"]
    names = names[:spec.max_models] if spec.max_models else names
    per = {k: v for k, v in PARAMS.items() if k in spec.model_params}
    cfg = {"merge_method": method, "models": [{"model": n, "parameters": per} for n in names],
           "parameters": {"t": 0.3} if "t" in spec.global_params else {}}
    if spec.inputs != "models":
        cfg["base_model"] = "a"
    g = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(64, 300, generator=g).to(dtype) for n in names}
    before = {n: t.clone() for n, t in tensors.items()}
    merge_tensor(load_config(cfg), name="model.layers.0.mlp.up_proj.weight", t=0.0, tensors=tensors)
    assert all(torch.equal(tensors[n], before[n]) for n in names)
