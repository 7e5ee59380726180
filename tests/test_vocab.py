"""Models with different vocabularies: `tokenizer_source` / `tokenizer:` re-index the embeddings token by token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

import safemerge
from safemerge.checkpoint import Checkpoint
from safemerge.errors import CheckpointError, ConfigError
from safemerge.vocab import vocab_plan
from tiny import VOCAB_TENSORS, make_family, vocab_of, vocab_variant


def _ta(fam: dict[str, Path], **over) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(fam["base"]),
            "models": [{"model": str(fam["expert"]), "parameters": {"weight": 1.0}},
                       {"model": str(fam["aligned"]), "parameters": {"weight": 1.0}}], **over}


def _merged(config: dict, out: Path) -> dict[str, torch.Tensor]:
    safemerge.merge(config, out, progress=False)
    return load_file(str(out / "model.safetensors"))


def test_a_renumbered_vocabulary_merges_as_the_original(tmp_path, tiny_family):
    n = len(vocab_of(tiny_family["aligned"]))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1)).tolist()
    fam = dict(tiny_family, aligned=vocab_variant(tiny_family["aligned"], tmp_path / "aligned-perm", perm=perm))
    want = _merged(_ta(tiny_family), tmp_path / "plain")
    got = _merged(_ta(fam, tokenizer_source="base"), tmp_path / "perm")
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert vocab_of(tmp_path / "perm") == vocab_of(tiny_family["base"])
    # without tokenizer_source the shapes agree and the rows of different tokens would merge: a warning says so
    with pytest.warns(UserWarning, match="number their tokens differently"):
        safemerge.merge(_ta(fam), tmp_path / "rows", progress=False)


def test_tokens_one_model_has_take_its_rows_and_the_output_takes_the_named_vocabulary(tmp_path, tiny_family):
    n = len(vocab_of(tiny_family["expert"]))
    expert = vocab_variant(tiny_family["expert"], tmp_path / "expert66", extra={"<|med|>": n, "drugX": n + 1})
    fam = dict(tiny_family, expert=expert)
    plain = _merged(_ta(tiny_family), tmp_path / "plain")
    rows = load_file(str(expert / "model.safetensors"))
    for source, size in (("base", n), (str(expert), n + 2)):
        got = _merged(_ta(fam, tokenizer_source=source), tmp_path / f"out-{size}")
        cfg = json.loads((tmp_path / f"out-{size}" / "config.json").read_text())
        assert cfg["vocab_size"] == size
        for name in VOCAB_TENSORS:
            assert got[name].shape[0] == size
            assert torch.equal(got[name][:n], plain[name][:n])
            if size > n:  # only the expert has them: every model takes its row, so the merge keeps it
                assert torch.equal(got[name][n:], rows[name][n:])
        assert (tmp_path / f"out-{size}" / "tokenizer.json").read_bytes() == (
            (tiny_family["base"] if source == "base" else expert) / "tokenizer.json").read_bytes()


def test_union_vocabulary_and_padding(tmp_path, tiny_family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    n = len(vocab_of(tiny_family["expert"]))
    fam = dict(tiny_family,
               expert=vocab_variant(tiny_family["expert"], tmp_path / "e", extra={"<|med|>": n, "drugX": n + 1}),
               aligned=vocab_variant(tiny_family["aligned"], tmp_path / "a", extra={"drugX": n, "<|safe|>": n + 1}, seed=1))
    e, a = (load_file(str(fam[k] / "model.safetensors")) for k in ("expert", "aligned"))
    out = tmp_path / "union"
    got = _merged(_ta(fam, tokenizer={"source": "union", "pad_to_multiple_of": 32}), out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|med|>", "drugX", "<|safe|>")}
    assert sorted(ids.values()) == [n, n + 1, n + 2] and len(tok) == n + 3
    emb = got["model.embed_tokens.weight"]
    assert emb.shape[0] == 96 and json.loads((out / "config.json").read_text())["vocab_size"] == 96
    assert torch.equal(emb[ids["<|med|>"]], e["model.embed_tokens.weight"][n])
    assert torch.equal(emb[ids["<|safe|>"]], a["model.embed_tokens.weight"][n + 1])
    # drugX: in both fine-tunes, not in the base: the base takes their mean m, so θ = m + (e − m) + (a − m)
    e_row, a_row = e["model.embed_tokens.weight"][n + 1], a["model.embed_tokens.weight"][n]
    assert torch.allclose(emb[ids["drugX"]], e_row + a_row - (e_row + a_row) / 2, atol=1e-7)
    # padding rows: each model's mean row, so (task arithmetic being linear) the merged rows' mean
    assert torch.allclose(emb[n + 3:], emb[: n + 3].mean(0).expand(96 - n - 3, -1), atol=1e-6)
    AutoModelForCausalLM.from_pretrained(out)  # a loadable checkpoint of the new size


def test_same_vocabularies_are_not_reindexed(tiny_family):
    models = {m: Checkpoint(p) for m, p in tiny_family.items()}
    routes = {n: {m: n for m in models} for n in VOCAB_TENSORS}
    assert vocab_plan("base", None, models=models, base_model="base", routes=routes) is None
    assert vocab_plan("base", 16, models=models, base_model="base", routes=routes) is not None


def test_without_tokenizer_source_different_vocabularies_are_refused(tmp_path, tiny_family):
    n = len(vocab_of(tiny_family["expert"]))
    fam = dict(tiny_family, expert=vocab_variant(tiny_family["expert"], tmp_path / "e", extra={"x": n}))
    with pytest.raises(CheckpointError, match="different vocabularies; set `tokenizer_source: base`"):
        safemerge.merge(_ta(fam), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_token_the_base_has_and_a_model_lacks_takes_the_bases_row_there(tmp_path, tiny_family):
    fam = dict(tiny_family, aligned=vocab_variant(tiny_family["aligned"], tmp_path / "a", drop="drug"))
    got = _merged(_ta(fam, tokenizer_source="base"), tmp_path / "out")
    i = vocab_of(tiny_family["base"])["drug"]
    e = load_file(str(tiny_family["expert"] / "model.safetensors"))
    plain = _merged(_ta(tiny_family), tmp_path / "plain")
    for name in VOCAB_TENSORS:  # θ = b + (e − b) + (b − b): the aligned model adds nothing to that token
        assert torch.allclose(got[name][i], e[name][i], atol=1e-7)
        assert not torch.allclose(got[name][i], plain[name][i], atol=1e-4)


def test_the_search_refuses_a_pool_whose_vocabularies_differ(tmp_path, tiny_family):
    from safemerge.search.candidates import CandidateModel

    n = len(vocab_of(tiny_family["aligned"]))
    perm = list(reversed(range(n)))
    fam = dict(tiny_family, aligned=vocab_variant(tiny_family["aligned"], tmp_path / "a", perm=perm))
    with pytest.raises(ConfigError, match="the pool's vocabularies differ"):
        CandidateModel(_ta(fam, tokenizer_source="base"))
    CandidateModel(_ta(tiny_family, tokenizer={"source": "union"}))  # one shared vocabulary: nothing to re-index


def test_an_outside_tokenizer_source_with_more_tokens_adds_their_rows(tmp_path, tiny_family):
    n = len(vocab_of(tiny_family["expert"]))
    outside = vocab_variant(tiny_family["expert"], tmp_path / "outside", extra={"<|med|>": n, "drugX": n + 1})
    got = _merged(_ta(tiny_family, tokenizer_source=str(outside)), tmp_path / "out")
    plain = _merged(_ta(tiny_family), tmp_path / "plain")
    for name in VOCAB_TENSORS:  # the inputs share a vocabulary, the named one has two tokens more: no input has
        assert got[name].shape[0] == n + 2  # a row for them, so every model takes zeros there (as mergekit)
        assert torch.equal(got[name][:n], plain[name][:n])
        assert not got[name][n:].any()
    assert vocab_of(tmp_path / "out") == vocab_of(outside)


def test_a_tokenizer_this_version_cannot_read_does_not_stop_a_plain_merge(tmp_path, tiny_family):
    import shutil

    odd = tmp_path / "odd"
    shutil.copytree(tiny_family["expert"], odd)
    (odd / "tokenizer.json").write_text('{"version": "9.9", "model": {"type": "Future"}}')
    safemerge.merge(_ta(dict(tiny_family, expert=odd)), tmp_path / "out", progress=False)


def test_default_rows_of_bf16_inputs_stay_float32_in_a_float32_config(tmp_path, tiny_family_bf16):
    fam = tiny_family_bf16
    n = len(vocab_of(fam["expert"]))
    fam = dict(fam, expert=vocab_variant(fam["expert"], tmp_path / "e", extra={"drugX": n}),
               aligned=vocab_variant(fam["aligned"], tmp_path / "a", extra={"drugX": n}, seed=1))
    got = _merged(_ta(fam, tokenizer_source="union", dtype="float32"), tmp_path / "out")
    e, a = (load_file(str(fam[k] / "model.safetensors"))["model.embed_tokens.weight"][n].float()
            for k in ("expert", "aligned"))
    m = (e + a) / 2  # the base lacks drugX: its row is the fine-tunes' mean, in float32 (not rounded to bf16)
    assert torch.allclose(got["model.embed_tokens.weight"][n], m + (e - m) + (a - m), atol=1e-7)


def test_a_token_special_in_any_model_is_special_in_the_union(tmp_path, tiny_family):
    from transformers import AutoTokenizer

    n = len(vocab_of(tiny_family["expert"]))
    fam = dict(tiny_family, expert=vocab_variant(tiny_family["expert"], tmp_path / "e", extra={"<|med|>": n}),
               aligned=vocab_variant(tiny_family["aligned"], tmp_path / "a", extra={"<|med|>": n},
                                     special=("<|med|>",)))
    safemerge.merge(_ta(fam, tokenizer_source="union"), tmp_path / "out", progress=False)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    med = tok.convert_tokens_to_ids("<|med|>")
    assert tok.decode([med], skip_special_tokens=True) == ""


def _linear(fam: dict[str, Path], **over) -> dict:
    return {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": str(fam["expert"]), "parameters": {"weight": 0.5}},
                       {"model": str(fam["aligned"]), "parameters": {"weight": 0.5}}], **over}


def test_tokenizer_tokens_give_rows_per_token(tmp_path, tiny_family):
    """mergekit's `tokenizer.tokens`: a token's rows from a named model, zero, or another token's row
    (`model_token`); where a model lacks the token, or in every model with `force`."""
    n = len(vocab_of(tiny_family["expert"]))
    expert = vocab_variant(tiny_family["expert"], tmp_path / "expert-med", extra={"<|med|>": n})
    fam = dict(tiny_family, expert=expert)
    e, a = load_file(str(expert / "model.safetensors")), load_file(str(tiny_family["aligned"] / "model.safetensors"))
    word = next(t for t, i in vocab_of(expert).items() if i == 20)  # a word both models have, at id 20
    auto = _merged(_linear(fam, tokenizer={"source": "union"}), tmp_path / "auto")
    tokens = {"<|med|>": {"source": {"kind": "zero"}},  # the aligned model lacks it: zero there, not the expert's row
              word: {"source": str(tiny_family["aligned"]), "force": True},  # both take the aligned model's row
              "</s>": {"source": {"kind": "model_token", "model": str(expert), "token": word}}}  # both have it: unused
    got = _merged(_linear(fam, tokenizer={"source": "union", "tokens": tokens}), tmp_path / "tokens")
    out = vocab_of(tmp_path / "tokens") if (tmp_path / "tokens" / "tokenizer.json").is_file() else None
    med = n if out is None else out["<|med|>"]
    for name in VOCAB_TENSORS:
        assert torch.equal(auto[name][med], e[name][n])  # the default: the one model's row that has it
        torch.testing.assert_close(got[name][med], 0.5 * e[name][n], rtol=0, atol=1e-7)
        assert torch.equal(got[name][20], a[name][20])
        assert torch.equal(got[name][3], auto[name][3])
        others = [i for i in range(n) if i != 20]
        assert torch.equal(got[name][others], auto[name][others])
    # a forced model_token row: both models take the expert's row of `word` for <|med|>
    tokens = {"<|med|>": {"source": {"kind": "model_token", "model": str(expert), "token": word}, "force": True}}
    got = _merged(_linear(fam, tokenizer={"source": "union", "tokens": tokens}), tmp_path / "model-token")
    for name in VOCAB_TENSORS:
        assert torch.equal(got[name][med], e[name][20])


def test_bad_tokenizer_tokens_are_errors_naming_the_token(tmp_path, tiny_family):
    n = len(vocab_of(tiny_family["expert"]))
    expert = vocab_variant(tiny_family["expert"], tmp_path / "expert-med", extra={"<|med|>": n})
    fam = dict(tiny_family, expert=expert)

    def fails(error, match, tokens):
        with pytest.raises(error, match=match):
            safemerge.merge(_linear(fam, tokenizer={"source": "union", "tokens": tokens}), tmp_path / "out", progress=False)
        assert not (tmp_path / "out").exists()

    fails(ConfigError, r"tokens\['<\|med\|>'\]: .*aligned has no token '<\|med\|>' among its 64 rows; take the row",
          {"<|med|>": {"source": str(tiny_family["aligned"])}})
    fails(ConfigError, r"tokens\['<\|med\|>'\]: .*aligned has no token 'nope' among its 64 rows$",
          {"<|med|>": {"source": {"kind": "model_token", "model": str(tiny_family["aligned"]), "token": "nope"}}})
    fails(ConfigError, r"tokens\['<\|med\|>'\]: .*aligned has no token id 64 among its 64 rows$",
          {"<|med|>": {"source": {"kind": "model_token", "model": str(tiny_family["aligned"]), "token_id": 64}}})
    fails(ConfigError, r"tokens\['<\|med\|>'\]: .*base is not one of the merged models",
          {"<|med|>": {"source": str(tiny_family["base"])}})
    fails(ConfigError, r"tokens\.<\|med\|>\.source: \{kind: model_token\} needs a model and one of token or token_id",
          {"<|med|>": {"source": {"kind": "model_token", "model": str(expert)}}})
    sliced = {"merge_method": "passthrough", "dtype": "float32",
              "slices": [{"sources": [{"model": str(expert), "layer_range": [0, 3]}]}],
              "tokenizer": {"source": "base", "tokens": {"<|med|>": {"source": str(tiny_family["base"])}}}}
    with pytest.raises(ConfigError, match="base is not one of the merged models"):
        safemerge.merge(sliced, tmp_path / "out", progress=False)


def test_tokens_the_output_lacks_are_added_and_unused_entries_are_not_read(tmp_path, tiny_family):
    """As mergekit: a listed token the output vocabulary lacks is added to its tokenizer (every model then takes the
    given row, or its own where it has the token); an entry no model needs (all have the token, no force) is not
    read, even where its source could not give a row."""
    n = len(vocab_of(tiny_family["expert"]))
    expert = vocab_variant(tiny_family["expert"], tmp_path / "expert-med", extra={"<|med|>": n})
    fam = dict(tiny_family, expert=expert)
    e = load_file(str(expert / "model.safetensors"))
    tokens = {"<|new|>": {"source": {"kind": "model_token", "model": str(expert), "token_id": 7}},
              "<|med|>": {"source": {"kind": "zero"}},
              "the": {"source": {"kind": "model_token", "model": str(tiny_family["aligned"]), "token": "<|med|>"}}}
    for source in ("base", str(tiny_family["aligned"]), "union"):
        out = tmp_path / f"out-{len(source)}"
        got = _merged(_linear(fam, tokenizer={"source": source, "tokens": tokens}), out)
        vocab = AutoTokenizer.from_pretrained(out).get_vocab()
        size = n + 2  # <|med|> (the expert's, in the union; added, in the others) and <|new|>
        assert json.loads((out / "config.json").read_text())["vocab_size"] == size == len(vocab)
        for name in VOCAB_TENSORS:
            assert got[name].shape[0] == size
            torch.testing.assert_close(got[name][vocab["<|new|>"]], e[name][7], rtol=0, atol=0)
            torch.testing.assert_close(got[name][vocab["<|med|>"]], 0.5 * e[name][n], rtol=0, atol=1e-7)


def test_padding_rows_are_kept_however_the_tokenizer_files_are_formatted(tmp_path):
    """80 embedding rows for 64 tokens (Qwen's padding): byte-identical tokenizer files kept all 80 rows, while the
    same vocabulary saved with other indentation was re-indexed and cut to 64 (vocab_size 64 in config.json)."""
    import json

    fam = make_family(tmp_path / "fam", vocab=80)
    f = fam["expert"] / "tokenizer.json"
    f.write_text(json.dumps(json.loads(f.read_text()), indent=4))
    for source in ("base", "union"):
        cfg = {"merge_method": "task_arithmetic", "base_model": str(fam["base"]), "tokenizer_source": source,
               "models": [{"model": str(fam[m]), "parameters": {"weight": 0.5}} for m in ("expert", "aligned")]}
        out = safemerge.merge(cfg, tmp_path / source, progress=False)
        assert Checkpoint(out).shape("model.embed_tokens.weight") == (80, 32)
        assert json.loads((out / "config.json").read_text())["vocab_size"] == 80


def _two_slices(first: list[Path], last: list[Path], **over) -> dict:
    return {"merge_method": "linear", "dtype": "float32", "parameters": {"weight": 0.5},
            "slices": [{"sources": [{"model": str(m), "layer_range": [0, 2]} for m in first]},
                       {"sources": [{"model": str(m), "layer_range": [2, 3]} for m in last]}], **over}


def test_a_sliced_merge_fills_each_vocabulary_tensor_from_its_own_sources(tmp_path, tiny_family):
    """A token a source lacks took, there, the top-level base_model's row even where that model is not among the
    tensor's sources (a zero row: half the token's row after a linear merge); mergekit fills each tensor from its
    own sources and its slice's base: here the one source that has the token."""
    n = len(vocab_of(tiny_family["expert"]))
    expert = vocab_variant(tiny_family["expert"], tmp_path / "expert-med", extra={"<|med|>": n})
    aligned = vocab_variant(tiny_family["aligned"], tmp_path / "aligned-med", extra={"<|med|>": n}, seed=3)
    config = _two_slices([aligned, tiny_family["base"]], [expert, tiny_family["base"]], base_model=str(expert),
                         tokenizer_source="union")
    got = _merged(config, tmp_path / "out")
    med = vocab_of(tmp_path / "out")["<|med|>"]
    a, e = load_file(str(aligned / "model.safetensors")), load_file(str(expert / "model.safetensors"))
    torch.testing.assert_close(got["model.embed_tokens.weight"][med], a["model.embed_tokens.weight"][n], rtol=0, atol=1e-7)
    torch.testing.assert_close(got["lm_head.weight"][med], e["lm_head.weight"][n], rtol=0, atol=1e-7)


def test_a_token_entry_is_needed_only_where_a_source_of_the_tensor_lacks_the_token(tmp_path, tiny_family):
    """An entry only the first slice's embeddings use was refused because its model does not feed the output head."""
    n = len(vocab_of(tiny_family["expert"]))
    expert = vocab_variant(tiny_family["expert"], tmp_path / "expert-med", extra={"<|med|>": n})
    aligned = vocab_variant(tiny_family["aligned"], tmp_path / "aligned-med", extra={"<|med|>": n}, seed=3)
    tokens = {"<|med|>": {"source": str(expert)}}
    got = _merged(_two_slices([expert, tiny_family["base"]], [aligned], tokenizer={"source": "union", "tokens": tokens}),
                  tmp_path / "ok")
    med = vocab_of(tmp_path / "ok")["<|med|>"]
    e = load_file(str(expert / "model.safetensors"))
    torch.testing.assert_close(got["model.embed_tokens.weight"][med], e["model.embed_tokens.weight"][n], rtol=0, atol=1e-7)
    # the head's source lacks it too: there the entry is needed, and its model does not feed the head
    with pytest.raises(ConfigError, match=r"tokens\['<\|med\|>'\]: .*expert-med gives its row, but lm_head.weight is not "
                                          "merged from it"):
        safemerge.merge(_two_slices([expert, tiny_family["base"]], [tiny_family["aligned"]],
                                    tokenizer={"source": "union", "tokens": tokens}), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()
