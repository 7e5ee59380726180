"""The merge config: mergekit keys, parameter resolution, and errors that name what is wrong."""

from __future__ import annotations

import re

import pytest

from safemerge.config import load_config, method_params, resolve
from safemerge.errors import ConfigError
from safemerge.layout import layer_index, num_layers, position


def cfg(**over):
    base = {"merge_method": "ties", "base_model": "b",
            "models": [{"model": "x", "parameters": {"weight": 1.0, "density": 0.5}}, {"model": "b"}]}
    return load_config({**base, **over})


def test_gradient_is_interpolated_over_layer_position():
    grad = [0, 0.5, 1, 0.5, 0]
    assert resolve(grad, tensor="x", t=0.0) == 0
    assert resolve(grad, tensor="x", t=0.5) == 1
    assert resolve(grad, tensor="x", t=1.0) == 0
    assert resolve(grad, tensor="x", t=0.125) == pytest.approx(0.25)


def test_filters_take_the_first_match_and_fall_back_to_the_default():
    c = load_config({"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}],
                     "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.7},
                                          {"value": 0.3}]}})
    t_of = lambda name, t: method_params(c, tensor=name, t=t)[0]["t"]
    assert t_of("model.layers.1.self_attn.q_proj.weight", 0.5) == pytest.approx(0.5)
    assert t_of("model.layers.1.mlp.up_proj.weight", 0.5) == 0.7
    assert t_of("model.norm.weight", 1.0) == 0.3


def test_a_star_filter_matches_every_tensor_as_in_mergekit():
    c = load_config({"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}],
                     "parameters": {"t": [{"filter": "mlp", "value": 0.3}, {"filter": "*", "value": 0.8}, {"value": 0.1}]}})
    t_of = lambda name: method_params(c, tensor=name, t=0.5)[0]["t"]
    assert t_of("model.layers.1.mlp.up_proj.weight") == 0.3
    assert t_of("model.layers.1.self_attn.q_proj.weight") == 0.8 and t_of("lm_head.weight") == 0.8


def test_layer_positions_follow_mergekit_pre_and_post_weights():
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert position("model.layers.0.x", 5) == 0 and position("model.layers.4.x", 5) == 1
    assert position("model.layers.2.x", 5) == 0.5
    assert position("model.embed_tokens.weight", 5) == 0.0
    assert position("transformer.wte.weight", 5) == 0.0
    # after the stack too: mergekit 0.1.5 plans post-weights with t = 0 (plan.py, plan_module), so a gradient's
    # first value applies to the final norm and lm_head
    assert position("model.norm.weight", 5) == 0.0 and position("lm_head.weight", 5) == 0.0
    assert num_layers(["model.layers.0.a", "model.layers.7.a"], {}) == 8
    assert num_layers([], {"num_hidden_layers": 3}) == 3


def test_per_model_params_fall_back_to_global_then_default():
    c = cfg(parameters={"density": 0.3})
    glob, per = method_params(c, tensor="w", t=0)
    assert per == {"weight": [1.0], "density": [0.5]}  # the base is not a task vector
    assert glob["normalize"] is True and glob["lambda"] == 1.0
    c = load_config({"merge_method": "ties", "base_model": "b", "parameters": {"density": 0.3},
                     "models": [{"model": "x", "parameters": {"weight": 2}}]})
    assert method_params(c, tensor="w", t=0)[1]["density"] == [0.3]


@pytest.mark.parametrize("bad, words", [
    ({"merge_method": "tis"}, ["'tis'", "did you mean", "'ties'"]),
    ({"dtyp": "bfloat16"}, ["unknown key", "dtyp"]),
    ({"parameters": {"densty": 0.5}}, ["densty", "did you mean", "'density'"]),
    ({"models": [{"model": "x", "parameters": {"weight": 1, "normalize": True}}]}, ["normalize", "global"]),
    ({"dtype": "float8"}, ["float8"]),
    ({"base_model": None}, ["needs base_model"]),
    ({"slices": [{"sources": [{"model": "x", "layer_range": [0, 1]}]}]}, ["give `models` or `slices`, not both"]),
    ({"models": []}, ["models is empty"]),
    ({"models": [{"model": "x", "parameters": {"weight": float("nan")}}]}, ["models[x].parameters.weight", "not a finite"]),
    ({"parameters": {"weight": float("inf")}}, ["parameters.weight", "not a finite"]),
    ({"models": [{"model": "x", "parameters": {"weight": "one"}}]}, ["weight", "'one' is not a number"]),
    ({"models": [{"model": "x", "parameters": {"weight": [1, float("nan")]}}]}, ["weight", "not a finite"]),
    ({"models": [{"model": "x", "parameters": {"weight": [{"filter": "mlp", "value": float("-inf")}, {"value": 1}]}}]},
     ["weight", "not a finite"]),
    ({"models": [{"model": "x", "parameters": {"weight": 1, "density": 0}}]}, ["density", "outside (0, 1]"]),
    ({"models": [{"model": "x", "parameters": {"weight": 1, "density": 1.5}}]}, ["density", "outside (0, 1]"]),
    ({"parameters": {"lambda": True}}, ["lambda", "True is not a number"]),
])
def test_bad_configs_name_the_problem(bad, words):
    with pytest.raises(ConfigError) as e:
        cfg(**bad)
    for w in words:
        assert w in str(e.value)


def test_missing_required_parameter_is_named():
    c = load_config({"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}]})
    with pytest.raises(ConfigError, match="'t'.*required"):
        method_params(c, tensor="w", t=0)


def test_yaml_errors_name_the_file(tmp_path):
    p = tmp_path / "c.yml"
    p.write_text("merge_method: [unclosed")
    with pytest.raises(ConfigError, match=str(p)):
        load_config(p)
    p.write_bytes(b"\xff\xfe\x00merge_method: ties")
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        load_config(p)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yml")


def _sliced(family, *, ranges=None, **over):
    b, e = str(family["base"]), str(family["expert"])
    ranges = ranges or [[0, 3], [0, 3]]  # the tiny family has 3 layers
    piece = {"sources": [{"model": b, "layer_range": ranges[0]},
                         {"model": e, "layer_range": ranges[1], "parameters": {"weight": 1.0}}],
             "parameters": {"density": [{"filter": "mlp", "value": 0.4}]}}
    return load_config({"merge_method": "ties", "base_model": b, "parameters": {"density": 0.6},
                        "slices": [{**piece, **over.pop("piece", {})}], **over})


def test_a_slice_of_whole_models_reads_as_models(tiny_family):
    c = _sliced(tiny_family)
    assert [m.model for m in c.models] == [str(tiny_family["base"]), str(tiny_family["expert"])]
    # the slice's parameters come before the top level's; where its filter matches nothing, the top level's apply
    assert method_params(c, tensor="model.layers.0.mlp.up_proj.weight", t=0)[1]["density"] == [0.4]
    assert method_params(c, tensor="model.layers.0.self_attn.q_proj.weight", t=0)[1]["density"] == [0.6]


def test_slices_that_cut_layers_stay_slices(tiny_family):
    c = _sliced(tiny_family, ranges=[[0, 2], [1, 3]])
    assert c.slices is not None and [s.layer_range for s in c.slices[0].sources] == [(0, 2), (1, 3)]
    assert [m.model for m in c.models] == [str(tiny_family["base"]), str(tiny_family["expert"])]
    sub = c.slice_config(0)  # the slice's own whole-model config, its parameters before the top level's
    assert sub.base_model == str(tiny_family["base"]) and [m.model for m in sub.models] == [m.model for m in c.models]
    assert method_params(sub, tensor="model.layers.0.mlp.up_proj.weight", t=0)[1]["density"] == [0.4]
    assert method_params(sub, tensor="model.layers.0.self_attn.q_proj.weight", t=0)[1]["density"] == [0.6]
    with pytest.raises(ConfigError, match="search takes a whole-model config"):
        c.require_whole_models("search")
    again = load_config(c.to_yaml_dict())  # what mergekit_config.yml holds reads back the same
    assert again.slices == c.slices and again.parameters == c.parameters and "models" not in c.to_yaml_dict()


@pytest.mark.parametrize("over, words", [
    ({"ranges": [[0, 3], [1, 3]]}, ["slices[0]", "the same number of layers", "[1, 3]"]),
    ({"ranges": [[2, 1], [2, 1]]}, ["layer_range [2, 1] must be [start, stop)"]),
    ({"ranges": [[0, "3"], [0, 3]]}, ["sources[0]", "layer_range must be [start, stop], two whole numbers"]),
    ({"piece": {"residual_weights": 0.5}}, ["slices[0]", "unknown key 'residual_weights'"]),
])
def test_bad_slices_are_refused(tiny_family, over, words):
    with pytest.raises(ConfigError) as e:
        _sliced(tiny_family, **over)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("empty", [{"models": []}, {"models": None}, {"modules": None}])
def test_an_empty_form_beside_slices_is_absent_as_mergekit_reads_it(tiny_family, empty):
    """A bare `models:` or `modules:` beside `slices:` was refused as a second form; mergekit merges it."""
    c = _sliced(tiny_family, **empty)
    assert [m.model for m in c.models] == [str(tiny_family["base"]), str(tiny_family["expert"])]
    plain = load_config({"merge_method": "linear", "slices": None, "parameters": {"weight": 1},
                         "models": [{"model": "a"}, {"model": "b"}]})
    assert [m.model for m in plain.models] == ["a", "b"]


def test_an_error_in_a_whole_slice_names_the_slice_not_models(tiny_family):
    """One slice of whole stacks is read as `models`; its errors named `models[...]`, a section the file lacks."""
    with pytest.raises(ConfigError, match=r"slices\[0\]\.sources\[.*expert\]\.parameters\.density: 2 is outside") as e:
        _sliced(tiny_family, piece={"sources": [{"model": str(tiny_family["base"]), "layer_range": [0, 3]},
                                                {"model": str(tiny_family["expert"]), "layer_range": [0, 3],
                                                 "parameters": {"weight": 1, "density": 2}}]})
    assert "models[" not in str(e.value)


def test_a_model_listed_twice_is_refused_as_mergekit_does(tiny_family):
    """mergekit refuses duplicate merge inputs; the engine had summed both entries and the search kept one."""
    b, e, a = (str(tiny_family[k]) for k in ("base", "expert", "aligned"))
    for again in (e, e + "/", f"{tiny_family['expert'].parent}/./{tiny_family['expert'].name}"):
        with pytest.raises(ConfigError, match=r"models: .* is listed twice; list each model once"):
            load_config({"merge_method": "task_arithmetic", "base_model": b, "models": [
                {"model": e, "parameters": {"weight": 1.0}}, {"model": a, "parameters": {"weight": 1.0}},
                {"model": again, "parameters": {"weight": 0.5}}]})
    assert len(load_config({"merge_method": "ties", "base_model": b, "models": [
        {"model": b}, {"model": e, "parameters": {"weight": 1.0}}]}).models) == 2  # the base once in models is fine
    spelt = load_config({"merge_method": "linear", "base_model": b, "models": [  # another spelling: not added again
        {"model": b + "/", "parameters": {"weight": 0.5}}, {"model": e, "parameters": {"weight": 0.5}}]})
    assert [m.model for m in spelt.models] == [b + "/", e]
    from safemerge.search.cocktail import linear_config

    ties = load_config({"merge_method": "ties", "base_model": b, "models": [
        {"model": b + "/"}, {"model": e, "parameters": {"weight": 1.0, "density": 0.5}}]})
    assert [m.model for m in ties.others()] == [e]  # the base under another spelling is still the base
    assert [m.model for m in linear_config(ties, [0.4, 0.6]).models] == [b + "/", e]  # LM-Cocktail's mix: no 2nd base
    with pytest.raises(ConfigError, match=r"slices\[0\]: .* is a source twice"):
        load_config({"merge_method": "linear", "parameters": {"weight": 1.0},
                     "slices": [{"sources": [{"model": e, "layer_range": [0, 1]}, {"model": e + "/", "layer_range": [1, 2]}]}]})


def test_others_compares_paths_once_per_base_and_models(tiny_family, monkeypatch):
    """The engine asks for every tensor (of every search candidate): the paths are resolved and compared once per
    (base, models), not per call; a changed base is seen."""
    import safemerge.config as config_module

    b, e = str(tiny_family["base"]), str(tiny_family["expert"])
    ties = load_config({"merge_method": "ties", "base_model": b, "models": [
        {"model": b + "/"}, {"model": e, "parameters": {"weight": 1.0, "density": 0.5}}]})
    calls = []
    real = config_module.same_model
    monkeypatch.setattr(config_module, "same_model", lambda x, y: calls.append(1) or real(x, y))
    for _ in range(50):
        assert [m.model for m in ties.others()] == [e]
    assert calls == []  # computed once, while the config was validated
    ties.base_model = e  # what others() was computed from has changed: computed again
    assert [m.model for m in ties.others()] == [b + "/"] and len(calls) == 2
    from safemerge.config import InputModel

    ties.base_model = b  # new model objects under the same paths: others() gives them, not the ones it first saw
    ties.models = [InputModel(model=b + "/"), InputModel(model=e, parameters={"weight": 0.25, "density": 0.5})]
    assert [m.parameters["weight"] for m in ties.others()] == [0.25]
    assert ties == ties.model_copy(deep=True)  # the memo is no part of the config (the copy has none): not compared


def test_slice_checks_name_the_slice(tiny_family):
    b, e, a = (str(tiny_family[k]) for k in ("base", "expert", "aligned"))
    whole = {"sources": [{"model": b, "layer_range": [0, 3]}]}
    with pytest.raises(ConfigError, match=r"slices\[1\]: .* is a source twice"):
        load_config({"merge_method": "linear", "parameters": {"weight": 1.0},
                     "slices": [whole, {"sources": [{"model": e, "layer_range": [0, 1]}, {"model": e, "layer_range": [1, 2]}]}]})
    with pytest.raises(ConfigError, match=r"slices\[1\]: base_model .* is not among the slice's sources"):
        load_config({"merge_method": "ties", "base_model": b, "parameters": {"weight": 1.0},
                     "slices": [whole, {"sources": [{"model": e, "layer_range": [0, 1]}, {"model": a, "layer_range": [0, 1]}]}]})
    with pytest.raises(ConfigError, match=r"slices\[0\]: .*passthrough takes 1 model; got 2"):
        load_config({"merge_method": "passthrough", "slices": [
            {"sources": [{"model": e, "layer_range": [0, 1]}, {"model": a, "layer_range": [0, 1]}]}, whole]})
    with pytest.raises(ConfigError, match=r"slices\[0\]: .*weight.* is required"):
        load_config({"merge_method": "linear", "slices": [{"sources": [{"model": e, "layer_range": [0, 1]}]}, whole]})
    with pytest.raises(ConfigError, match="give `models` or `slices`, not both"):
        load_config({"merge_method": "linear", "models": [{"model": b}], "slices": [whole]})
    with pytest.raises(ConfigError, match=r"slices\[0\]: base_model .* is not among the slice's sources"):
        load_config({"merge_method": "multislerp", "base_model": b, "parameters": {"weight": 1.0},
                     "slices": [{"sources": [{"model": e, "layer_range": [0, 1]}, {"model": a, "layer_range": [0, 1]}]}]})
    with pytest.raises(ConfigError, match="multislerp needs at least one model besides base_model"):
        load_config({"merge_method": "multislerp", "base_model": b, "models": [{"model": b, "parameters": {"weight": 1.0}}]})


def test_a_slice_base_is_its_own(tiny_family):
    b, e, a = (str(tiny_family[k]) for k in ("base", "expert", "aligned"))
    c = load_config({"merge_method": "multislerp", "parameters": {"weight": 1.0}, "slices": [
        {"sources": [{"model": e, "layer_range": [0, 1]}, {"model": a, "layer_range": [0, 1]}]},
        {"base_model": b, "sources": [{"model": b, "layer_range": [1, 2]}, {"model": e, "layer_range": [1, 2]},
                                      {"model": a, "layer_range": [1, 2]}]}]})
    assert c.base_model is None  # one slice's base is not every slice's (mergekit reads it per slice)
    assert c.slice_config(0).base_model is None and c.slice_config(1).base_model == b
    top = load_config({"merge_method": "ties", "base_model": a, "parameters": {"weight": 1.0}, "slices": [
        {"base_model": b, "sources": [{"model": b, "layer_range": [0, 1]}, {"model": e, "layer_range": [0, 1]}]}]})
    assert top.slice_config(0).base_model == b  # a slice's base overrides the top level's


def test_linear_merges_an_unlisted_base_as_mergekit_does():
    c = load_config({"merge_method": "linear", "base_model": "b", "parameters": {"weight": 1.0}, "models": [{"model": "x"}]})
    assert [m.model for m in c.models] == ["x", "b"] and method_params(c, tensor="w", t=0)[1]["weight"] == [1.0, 1.0]
    with pytest.raises(ConfigError, match=r"models\[b\]: parameter 'weight' of linear is required \(base_model is merged"):
        load_config({"merge_method": "linear", "base_model": "b", "models": [{"model": "x", "parameters": {"weight": 1}}]})


def test_torch_dtype_names_are_read_as_mergekit_reads_them():
    c = load_config({"merge_method": "linear", "dtype": "torch.bfloat16", "out_dtype": "torch.float16",
                     "models": [{"model": "x", "parameters": {"weight": 1}}, {"model": "y", "parameters": {"weight": 1}}]})
    assert (c.dtype, c.out_dtype) == ("bfloat16", "float16")
    with pytest.raises(ConfigError, match="dtype 'bfloat17' is not one of"):
        load_config({"merge_method": "linear", "dtype": "torch.bfloat17", "models": [{"model": "x"}, {"model": "y"}]})


def test_strings_and_single_mappings_are_read_as_mergekit_reads_them():
    assert method_params(cfg(parameters={"normalize": 0}), tensor="w", t=0)[0]["normalize"] is False
    c = cfg(parameters={"normalize": "false", "lambda": "5e-1", "int8_mask": " True "},
            models=[{"model": "x", "parameters": {"weight": {"filter": "mlp", "value": "0.25"}, "density": "5e-1"}},
                    {"model": "b", "parameters": None}])
    glob, per = method_params(c, tensor="model.layers.0.mlp.up_proj.weight", t=0)
    assert glob == {"lambda": 0.5, "int8_mask": True, "normalize": False, "rescale": False}
    assert per == {"weight": [0.25], "density": [0.5]}
    with pytest.raises(ConfigError, match="parameters.normalize: 'maybe' is not true or false"):
        cfg(parameters={"normalize": "maybe"})
    with pytest.raises(ConfigError, match=r"parameters.normalize: a gradient \(a list of values\) is for numbers"):
        cfg(parameters={"normalize": [True, False]})  # the message said "1.0 is not true or false"
    c = cfg(parameters={"normalize": [{"filter": "mlp", "value": False}, {"value": True}]})  # a filter list is fine
    assert method_params(c, tensor="model.layers.0.mlp.up_proj.weight", t=0)[0]["normalize"] is False
    with pytest.raises(ConfigError, match="parameters.lambda: 'maybe' is not a number"):
        cfg(parameters={"lambda": "maybe"})
    for where, params in (("models[x].parameters.weight", {"models": [{"model": "x", "parameters": {"weight": []}}]}),
                          ("parameters.density", {"parameters": {"density": [{"filter": "mlp", "value": []}, {"value": 0.5}]}})):
        with pytest.raises(ConfigError, match=rf"{re.escape(where)}: an empty list"):
            cfg(**params)


@pytest.mark.parametrize("bad, words", [
    ({"merge_method": "model_stock", "models": [{"model": "x"}]}, ["model_stock needs at least two models"]),
    ({"tokenizer": {"source": "base", "tokens": {"<x>": {"source": "zero"}}}},  # {kind: zero}, not a model "zero"
     ["tokenizer.tokens['<x>']: zero is not one of the merged models", "{kind: zero}"]),
    ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": "x", "token": "a", "token_id": 1}}}}},
     ["tokenizer.tokens.<x>.source: {kind: model_token} needs a model and one of token or token_id"]),
    ({"tokenizer": {"source": "base"}, "tokenizer_source": "base"}, ["`tokenizer_source` or a `tokenizer:` section"]),
    ({"tokenizer": {"source": "base", "pad_to_multiple_of": 0}}, ["pad_to_multiple_of"]),
    ({"modules": {"text_decoder": {"models": [{"model": "x"}]}}}, ["`modules:`", "not supported"]),
])
def test_more_configs_mergekit_reads_that_are_refused_clearly(bad, words):
    with pytest.raises(ConfigError) as e:
        cfg(**bad)
    for w in words:
        assert w in str(e.value)


def test_a_single_default_module_reads_as_the_plain_form(tiny_family):
    """mergekit-multi writes every config back as `modules: {default: {slices: ...}}`; its parameters sit between
    the slice's and the top level's."""
    b, e = str(tiny_family["base"]), str(tiny_family["expert"])
    slices = [{"sources": [{"model": b, "layer_range": [0, 2]}, {"model": e, "layer_range": [0, 2]}]},
              {"sources": [{"model": e, "layer_range": [2, 3]}, {"model": b, "layer_range": [2, 3]}]}]
    c = load_config({"merge_method": "slerp", "base_model": b, "parameters": {"t": 0.2},
                     "modules": {"default": {"slices": slices, "parameters": {"t": [{"filter": "mlp", "value": 0.7}]}}}})
    plain = load_config({"merge_method": "slerp", "base_model": b, "slices": slices,
                         "parameters": {"t": [{"filter": "mlp", "value": 0.7}, {"value": 0.2}]}})
    assert c.to_yaml_dict() == plain.to_yaml_dict()
    assert method_params(c, tensor="model.layers.0.mlp.up_proj.weight", t=0)[0]["t"] == 0.7
    assert method_params(c, tensor="model.layers.0.self_attn.q_proj.weight", t=0)[0]["t"] == 0.2
    whole = load_config({"merge_method": "linear", "modules": {"default": {"models": [
        {"model": e, "parameters": {"weight": 1.0}}]}}})
    assert [m.model for m in whole.models] == [e]
    empty = load_config({"merge_method": "slerp", "base_model": b, "parameters": {"t": 0.2}, "models": None,
                         "modules": {"default": {"models": [], "slices": slices}}})  # empty or null reads as absent
    assert empty.to_yaml_dict() == load_config({"merge_method": "slerp", "base_model": b, "parameters": {"t": 0.2},
                                                "slices": slices}).to_yaml_dict()
    for bad, words in (({"default": {"models": [], "slices": []}}, "needs `models` or `slices` (one of them)"),
                       ({"default": None}, "modules.default must be a mapping"),
                       ({"default": {"slices": slices, "sources": []}}, "modules.default: unknown key 'sources'"),
                       ({"default": {"slices": slices}, "vision_tower": {"slices": slices}}, "only a single `default`")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            load_config({"merge_method": "slerp", "base_model": b, "parameters": {"t": 0.2}, "modules": bad})
    with pytest.raises(ConfigError, match="give `modules` or `models`, not both"):
        load_config({"merge_method": "linear", "models": [{"model": e}], "modules": {"default": {"models": [{"model": e}]}}})


def test_unknown_keys_are_errors_unless_ignored_as_mergekit_does(tiny_family):
    """Real configs carry keys mergekit ignores (sce's `normalize`, model_stock's `weight`, a stray `dype`)."""
    b, e, a = (str(tiny_family[k]) for k in ("base", "expert", "aligned"))
    messy = {"merge_method": "sce", "base_model": b, "dype": "bfloat16", "parameters": {"select_topk": 0.5, "normalize": True},
             "models": [{"model": e, "parameters": {"weight": 0.5}}, {"model": a, "parameters": {"weight": 0.5}}],
             "tokenizer": {"source": "base", "mode": "x"}}
    clean = {"merge_method": "sce", "base_model": b, "parameters": {"select_topk": 0.5},
             "models": [{"model": e}, {"model": a}], "tokenizer": {"source": "base"}}
    with pytest.raises(ConfigError, match=r"unknown key 'dype'; did you mean 'dtype'\?.*--ignore-unknown"):
        load_config(messy)
    with pytest.warns(UserWarning, match=r"ignored 5 unknown key\(s\).*: dype, models\[0\]\.parameters\.weight, "
                                         r"models\[1\]\.parameters\.weight, parameters\.normalize, tokenizer\.mode"):
        got = load_config(messy, ignore_unknown=True)
    assert got.to_yaml_dict() == load_config(clean).to_yaml_dict()
    sliced = {"merge_method": "passthrough", "slices": [{"sources": [{"model": e, "layer_range": [0, 2], "revision": "main"}]}]}
    with pytest.warns(UserWarning, match=r"slices\[0\]\.sources\[0\]\.revision"):
        load_config(sliced, ignore_unknown=True)
    with pytest.raises(ConfigError, match="parameters.t\\[0\\]: unknown key 'pattern' in a filter entry") as err:
        load_config({"merge_method": "slerp", "base_model": b, "models": [{"model": e}],
                     "parameters": {"t": [{"pattern": "mlp", "value": 0.3}, {"value": 0.5}]}}, ignore_unknown=True)
    assert "--ignore-unknown" not in str(err.value)  # it would not help: the entry's meaning depends on the key
    with pytest.raises(ConfigError, match="merge_method 'ranked_ties' is unknown"):  # not an empty `parameters:` error
        load_config({"merge_method": "ranked_ties", "parameters": None, "models": [{"model": e}]})


def test_a_model_revision_is_refused_clearly(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ConfigError, match="'model@revision' of a local folder: check out"):
        load_config({"merge_method": "linear", "models": [{"model": f"{tmp_path / 'm'}@main", "parameters": {"weight": 1}}]})


def test_a_slice_parameter_as_a_single_mapping_falls_through_like_a_list(tiny_family):
    c = _sliced(tiny_family, piece={"parameters": {"density": {"filter": "mlp", "value": 0.4}}})
    assert method_params(c, tensor="model.layers.0.mlp.up_proj.weight", t=0)[1]["density"] == [0.4]
    assert method_params(c, tensor="model.layers.0.self_attn.q_proj.weight", t=0)[1]["density"] == [0.6]


def test_a_key_given_twice_is_an_error_on_one_line(tmp_path):
    """QA: two `weight:` lines merged with the last one, without a word; PyYAML's errors ran over several lines."""
    twice = tmp_path / "twice.yml"
    twice.write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: 0.5\n      weight: 0.1\n")
    with pytest.raises(ConfigError, match=r"twice.yml: invalid YAML at line 6, column 7: key 'weight' is given twice in "
                                          r"one mapping \(first on line 5\); keep one$"):
        load_config(twice)
    broken = tmp_path / "broken.yml"
    broken.write_text("merge_method: linear\nmodels:\n  - model: a\n   parameters: x\n")
    with pytest.raises(ConfigError, match=r"broken.yml: invalid YAML at line 4, column 4: expected <block end>") as e:
        load_config(broken)
    assert "\n" not in str(e.value)
    anchors = tmp_path / "anchors.yml"  # a merge key (<<) and a key that overrides it are not a key given twice
    anchors.write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters: &p {weight: 0.5}\n"
                       "  - model: b\n    parameters:\n      <<: *p\n      weight: 0.25\n")
    assert [m.parameters["weight"] for m in load_config(anchors).models] == [0.5, 0.25]


@pytest.mark.parametrize("value, shown", [(None, "weight: null"), ([1.0, "x"], 'weight: [1.0, "x"]'),
                                          ([{"filter": "mlp", "value": None}], "weight.0.value: null")])
def test_a_parameter_of_no_known_form_is_one_message(value, shown):
    """QA: `weight: null` gave six pydantic messages, one per form a parameter may take, naming the model by index."""
    with pytest.raises(ConfigError) as e:
        load_config({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": value}},
                                                          {"model": "b", "parameters": {"weight": 0.5}}]})
    assert str(e.value) == (f"config: models[a].parameters.{shown} is not a number, a list of numbers (a gradient "
                            "over the layers) or a list of filter entries ({filter: ..., value: ...})")


def test_did_you_mean_never_suggests_the_key_itself():
    with pytest.raises(ConfigError) as e:  # `layer_range` is a key of slices' sources, not of models
        load_config({"merge_method": "linear", "models": [{"model": "a", "layer_range": [0, 1], "parameters": {"weight": 1}},
                                                          {"model": "b", "parameters": {"weight": 1}}]})
    assert "unknown key 'models[a].layer_range'" in str(e.value) and "did you mean 'layer_range'" not in str(e.value)
