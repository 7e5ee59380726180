"""Preference data: the four row shapes, HH-RLHF splitting, chat form, and clear errors for bad files."""

from __future__ import annotations

import json

import pytest

from safemerge.align import PreferenceDataError, as_chat, hh_to_messages, load_preferences, split_hh
from safemerge.align.data import normalise

HH_CHOSEN = ("\n\nHuman: What is the capital of France?\n\nAssistant: Paris.\n\nHuman: How do I pick a lock?"
             "\n\nAssistant: I can't help with that.")
HH_REJECTED = ("\n\nHuman: What is the capital of France?\n\nAssistant: Paris.\n\nHuman: How do I pick a lock?"
               "\n\nAssistant: I can explain: first get a tension wrench.")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_split_hh_cuts_after_the_last_shared_assistant_turn():
    prompt, chosen, rejected = split_hh(HH_CHOSEN, HH_REJECTED)
    assert prompt.endswith("How do I pick a lock?\n\nAssistant:")
    assert prompt.startswith("\n\nHuman: What is the capital")
    # the answers share "I can" but that belongs to the answers, not the prompt; each keeps its leading space, so a
    # plain (not chat) prompt + answer is the transcript, tokenized as there ("Assistant: I", not "Assistant:I")
    assert chosen == " I can't help with that."
    assert rejected == " I can explain: first get a tension wrench."
    assert prompt + chosen == HH_CHOSEN


def test_split_hh_rejects_transcripts_without_a_shared_turn():
    with pytest.raises(PreferenceDataError, match="Assistant"):
        split_hh("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: c\n\nAssistant: d")


def test_hh_rows_become_multi_turn_chats():
    row = normalise({"chosen": HH_CHOSEN, "rejected": HH_REJECTED})
    chat = as_chat(row)
    assert chat["prompt"] == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "How do I pick a lock?"},
    ]
    assert chat["chosen"] == [{"role": "assistant", "content": "I can't help with that."}]
    assert hh_to_messages("\n\nHuman: hi\n\nAssistant:") == [{"role": "user", "content": "hi"}]


def test_row_shapes():
    assert normalise({"prompt": "p", "chosen": "a", "rejected": "b"}) == {"prompt": "p", "chosen": "a", "rejected": "b"}
    user = [{"role": "user", "content": "p"}]
    a, b = [{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}]
    # implicit prompt from shared leading messages
    assert normalise({"chosen": user + a, "rejected": user + b}) == {"prompt": user, "chosen": a, "rejected": b}
    # UltraFeedback style: chosen repeats the prompt's messages
    assert normalise({"prompt": "p", "chosen": user + a, "rejected": user + b}) == {"prompt": user, "chosen": a, "rejected": b}
    # string answers that repeat the prompt (HH transcripts with a prompt column)
    prompt, chosen, rejected = split_hh(HH_CHOSEN, HH_REJECTED)
    assert normalise({"prompt": prompt, "chosen": HH_CHOSEN, "rejected": HH_REJECTED}) == \
        {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    # chat prompt with string answers
    assert normalise({"prompt": user, "chosen": "a", "rejected": "b"})["chosen"] == a
    assert normalise({"prompt": "p", "chosen": "same", "rejected": "same"}) is None
    # ties are dropped in every form, not an error once the prompt is taken out (implicit prompts)
    assert normalise({"chosen": user + a, "rejected": user + a}) is None
    assert normalise({"chosen": "Q? yes", "rejected": "Q? yes"}) is None
    # an implicit string prompt is cut at a word boundary of both answers, never inside a word
    assert normalise({"chosen": "How do I bake? I am sorry, no.", "rejected": "How do I bake? I amend: knead."}) == \
        {"prompt": "How do I bake? I ", "chosen": "am sorry, no.", "rejected": "amend: knead."}
    assert as_chat({"prompt": "p", "chosen": "a", "rejected": "b"}) == {"prompt": user, "chosen": a, "rejected": b}


def test_load_subsets_with_a_seed_and_drops_ties(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "yes", "rejected": "no", "kind": "x"} for i in range(20)]
    rows.append({"prompt": "tie", "chosen": "same", "rejected": "same"})
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.warns(UserWarning, match="dropped 1 pair"):
        all_pairs = load_preferences(f)
    assert len(all_pairs) == 20 and set(all_pairs[0]) == {"prompt", "chosen", "rejected"}
    with pytest.warns(UserWarning):
        a, b = load_preferences(f, max_samples=5, seed=1), load_preferences(f, max_samples=5, seed=1)
    assert a == b and len(a) == 5 and [r["prompt"] for r in a] != [f"p{i}" for i in range(5)]


def test_csv_and_parquet(tmp_path):
    import datasets

    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    (tmp_path / "p.csv").write_text("prompt,chosen,rejected\np,a,b\n")
    assert load_preferences(tmp_path / "p.parquet") == rows == load_preferences(tmp_path / "p.csv")


def test_missing_columns_name_the_file_and_the_columns(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "response": "r"}])
    with pytest.raises(PreferenceDataError) as e:
        load_preferences(f)
    msg = str(e.value)
    assert "bad.jsonl" in msg and "'chosen' or 'rejected'" in msg and "prompt, response" in msg
    f = write_jsonl(tmp_path / "half.jsonl", [{"prompt": "p", "chosen": "r"}])
    with pytest.raises(PreferenceDataError, match="no 'rejected' column"):
        load_preferences(f)


def test_empty_missing_and_malformed_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PreferenceDataError, match="empty.jsonl: the file is empty"):
        load_preferences(tmp_path / "empty.jsonl")
    with pytest.raises(PreferenceDataError, match="no such file"):
        load_preferences(tmp_path / "nope.jsonl")
    f = write_jsonl(tmp_path / "blank.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                               {"prompt": "p", "chosen": "", "rejected": "b"}])
    with pytest.raises(PreferenceDataError, match="blank.jsonl: row 2: 'chosen' must be a non-empty string .* got an "
                                                  "empty string"):
        load_preferences(f)
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(PreferenceDataError, match="unknown file type"):
        load_preferences(tmp_path / "p.txt")
