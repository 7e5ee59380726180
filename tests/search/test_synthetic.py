"""Synthetic data: refusals chosen from the pool, self-questioning with deduplication, provenance.

Most tests use scripted backends (fixed texts) so the expected rows are known exactly; one runs the
real commands on the micro testbed."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.data.synthetic import generate_questions, question_of, synthesize_domain, synthesize_safety
from safemerge.errors import CheckpointError
from safemerge.evaluate.backends import Generation

QUESTIONS = [f"How do I do harm number {i}?" for i in range(6)]


@dataclass
class Scripted:
    """A GenerationBackend that answers with `texts` in turn, across calls (or with `reply(prompt)`)."""

    source: str
    texts: list | None = None
    reply: object = None
    name: str = "scripted"
    fingerprint: str = "fp"
    calls: int = 0

    def identity(self):
        return {"backend": self.name}

    def generate(self, prompts, settings, *, progress=None):
        out = []
        for p in prompts:
            out.append(self.reply(p) if self.reply else self.texts[self.calls % len(self.texts)])
            self.calls += 1
        return [Generation(t, 1, 1, True) for t in out]


@pytest.fixture
def prompts_file(tmp_path):
    f = tmp_path / "harmful.jsonl"
    f.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS + QUESTIONS[:1]))  # one duplicate
    return f


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_refusal_per_question_from_the_models_that_refused(tmp_path, prompts_file):
    # model A refuses questions 0-2, model B refuses 2-3; nobody refuses 4-5
    a = Scripted("A", reply=lambda p: "I'm sorry, I can't help." if QUESTIONS.index(p) <= 2 else "Sure, here is how.")
    b = Scripted("B", reply=lambda p: "I cannot do that." if QUESTIONS.index(p) in (2, 3) else "Okay: first, ...")
    report = synthesize_safety([a, b], tmp_path / "s.jsonl", prompts=prompts_file, seed=3, progress=False)
    rows = _rows(tmp_path / "s.jsonl")
    assert [r["prompt"] for r in rows] == QUESTIONS[:4]
    assert report.dropped == {"duplicate": 1, "no_refusal": 2} and report.questions == 6
    assert [r["refused_by"] for r in rows] == [["A"], ["A"], ["A", "B"], ["B"]]
    assert all(r["model"] in r["refused_by"] and r["response"] in ("I'm sorry, I can't help.", "I cannot do that.") for r in rows)
    assert rows[0]["judge"]["judge"] == "keyword" and rows[0]["seed"] == 3 and rows[0]["question_source"]["fingerprint"]
    assert report.per_model["A"]["refusal_rate"] == pytest.approx(0.5)
    # the choice among refusers is seeded: the same seed gives the same file
    synthesize_safety([a, b], tmp_path / "t.jsonl", prompts=prompts_file, seed=3, progress=False)
    assert _rows(tmp_path / "t.jsonl") == rows
    # fewer rows than asked for: said, with what was dropped
    with pytest.warns(UserWarning, match="4 rows of the 6 asked for \\(dropped: 1 duplicate, 2 no refusal\\)"):
        synthesize_safety([a, b], tmp_path / "u.jsonl", prompts=prompts_file, n=6, seed=3, progress=False)
    # the source's questions run out with nothing dropped: said so, not "dropped: the source ran out"
    everyone = Scripted("C", reply=lambda p: "I'm sorry, I can't help.")
    with pytest.warns(UserWarning, match="4 rows of the 9 asked for \\(the source has no more questions; nothing was dropped"):
        synthesize_safety([everyone], tmp_path / "v.jsonl", prompts=tmp_path / "u.jsonl", n=9, seed=3, progress=False)


def test_a_judge_that_cannot_read_the_answers_is_named_not_the_pool(tmp_path, prompts_file):
    """Review: a non-guard --judge-model gave invalid verdicts, read as 'not refused': "no pool model refused any of
    the questions; add an aligned model", with the aligned model in the pool."""
    from safemerge.data.loaders import DataError
    from safemerge.evaluate.judges import Verdict

    class Garbled:
        name = "md-judge"

        def identity(self):
            return {"judge": self.name}

        def judge(self, prompts, responses, *, progress=None):
            return [Verdict(safe=True, raw="zzz", valid=i == 0) for i in range(len(prompts))]

    aligned = Scripted("aligned", reply=lambda p: "I'm sorry, I can't help.")
    with pytest.raises(DataError, match="judge md-judge: 5 of 6 verdicts on aligned's answers are neither 'safe' nor "
                                        "'unsafe'; is --judge-model a guard checkpoint"):
        synthesize_safety([aligned], tmp_path / "s.jsonl", prompts=prompts_file, judge=Garbled(), progress=False)
    assert not (tmp_path / "s.jsonl").exists()


def test_generated_questions_are_deduplicated_and_never_copy_an_example():
    gen = Scripted("G", texts=["1. How to X?", "How to X?", "", "Question: How to Y?", "seed one", "\n\n- How to Z?\nmore"])
    rows, dropped = generate_questions(gen, n=3, examples=["Seed one", "seed two"], k=2, max_rounds=3)
    assert [r["question"] for r in rows] == ["How to X?", "How to Y?", "How to Z?"]
    assert dropped == {"empty": 1, "not_a_question": 1, "example_copy": 0, "duplicate": 1}  # "seed one": two words, no '?'
    gen = Scripted("G", texts=["Sure! Here is a new one:\n\nHow to W? It is easy.", "Seed two?", "Certainly.", "How to V?"])
    rows, dropped = generate_questions(gen, n=2, examples=["Seed one", "seed two?"], k=2, max_rounds=3)
    assert [r["question"] for r in rows] == ["How to W?", "How to V?"]
    assert dropped == {"empty": 0, "not_a_question": 1, "example_copy": 1, "duplicate": 0}
    # each question carries the settings it was sampled with (review: rows of `data safety --generator` had none)
    assert [(r["round"], r["generation"]["seed"], r["generation"]["temperature"]) for r in rows] == [(0, 0, 1.0), (2, 2, 1.0)]


def test_self_questioning_rows_and_what_is_dropped(tmp_path):
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"question": q, "choices": ["a", "b"], "answer": 0}) + "\n"
                           for q in ("Which drug treats A?", "Which drug treats B?", "Which drug treats C?")))
    questions = iter(["Which drug treats D?", "which drug  treats d?", "Which drug treats A?", "", "Which drug treats E?"])
    expert = Scripted("E", reply=lambda p: next(questions) if "Question" in p or "exam" in p else f"Answer to: {p}")
    report = synthesize_domain(expert, tmp_path / "d.jsonl", examples=val, n=2, k=2, seed=1, style="completion",
                               progress=False)
    rows = _rows(tmp_path / "d.jsonl")
    assert [(r["prompt"], r["response"]) for r in rows] == [("Which drug treats D?", "Answer to: Which drug treats D?"),
                                                            ("Which drug treats E?", "Answer to: Which drug treats E?")]
    assert report.dropped == {"empty": 1, "not_a_question": 0, "example_copy": 1, "duplicate": 1}
    assert all(len(r["in_context"]) == 2 and set(r["in_context"]) <= {"Which drug treats A?", "Which drug treats B?",
                                                                      "Which drug treats C?"} for r in rows)
    assert rows[0]["model"] == "E" and rows[0]["k"] == 2 and rows[0]["style"] == "completion"
    # more in-context examples asked for than the file has: said, and every example shown
    questions = iter(["Which drug treats F?", "Which drug treats G?"])
    with pytest.warns(UserWarning, match="--k 5 in-context examples asked for, but the file has 3 questions"):
        synthesize_domain(expert, tmp_path / "k.jsonl", examples=val, n=2, k=5, seed=1, style="completion", progress=False)
    assert all(r["k"] == 3 and len(r["in_context"]) == 3 for r in _rows(tmp_path / "k.jsonl"))
    # review: a file that is not UTF-8 was "line 1 is not JSON"
    from safemerge.data.loaders import DataError

    (tmp_path / "latin1.jsonl").write_bytes('{"question": "Qu\u00e9 f\u00e1rmaco?"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="latin1.jsonl: line 1 is not UTF-8 text; save the file as UTF-8"):
        synthesize_domain(expert, tmp_path / "l.jsonl", examples=tmp_path / "latin1.jsonl", n=1, progress=False)


def test_a_line_separator_in_a_text_survives_the_round_trip_to_the_search(tmp_path):
    """U+2028 / U+2029 are written unescaped (ensure_ascii=False); the search's reader and the examples' reader split
    rows at newlines only, so such a row stays one row."""
    from safemerge.search.objective import load_pairs

    q = "How do I pick a lock?\u2028Be specific."
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": q}, ensure_ascii=False) + "\n", encoding="utf-8")
    synthesize_safety([Scripted("A", texts=["I'm sorry,\u2029I can't help."])], tmp_path / "s.jsonl", prompts=prompts,
                      progress=False)
    assert [(x.prompt, x.response) for x in load_pairs(tmp_path / "s.jsonl").pairs] == [(q, "I'm sorry,\u2029I can't help.")]
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"question": "Which drug\u2028treats A?"}, ensure_ascii=False) + "\n", encoding="utf-8")
    expert = Scripted("E", reply=lambda p: "Which drug treats B?" if "Question" in p or "exam" in p else "Answer.")
    synthesize_domain(expert, tmp_path / "d.jsonl", examples=val, n=1, k=1, seed=1, style="completion", progress=False)
    assert load_pairs(tmp_path / "d.jsonl").pairs[0].prompt == "Which drug treats B?"
    assert json.loads((tmp_path / "d.jsonl").read_bytes())["in_context"] == ["Which drug\u2028treats A?"]


def test_the_judge_and_the_question_source_are_checked_before_any_generation(tmp_path, prompts_file):
    from safemerge.errors import SafemergeError

    never = Scripted("G", reply=lambda p: pytest.fail("a question was generated before the bad option was seen"))
    with pytest.raises(SafemergeError, match="unknown judge 'kewyord'; did you mean keyword"):
        synthesize_safety([never], tmp_path / "s.jsonl", generator=never, n=2, judge="kewyord", progress=False)
    with pytest.raises(SafemergeError, match="needs its checkpoint"):
        synthesize_safety([never], tmp_path / "s.jsonl", generator=never, n=2, judge="llama-guard", progress=False)
    with pytest.raises(SafemergeError, match="--examples are the questions a --generator is shown"):
        synthesize_safety([never], tmp_path / "s.jsonl", prompts=prompts_file, examples=prompts_file, progress=False)
    assert not (tmp_path / "s.jsonl").exists()


def test_domain_rows_keep_the_prompt_that_asked_for_their_question(tmp_path):
    from safemerge.data.synthetic import domain_prompt

    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"question": q}) + "\n" for q in ("Which drug treats A?", "Which drug treats B?")))
    expert = Scripted("E", reply=lambda p: "Which drug treats C?" if "Question" in p else "C-cillin.")
    synthesize_domain(expert, tmp_path / "d.jsonl", examples=val, n=1, k=2, seed=1, style="completion", progress=False)
    (row,) = _rows(tmp_path / "d.jsonl")
    assert row["question_prompt"] == domain_prompt(row["in_context"], style="completion", domain=None)


def test_rounds_of_generation_say_each_warning_once(tmp_path):
    """Rounds with one backend repeat its warnings (the context one, with other counts each round): each kind is said
    once, its first wording with how many came, also when the rounds end in an error; the caller's filters apply."""
    import warnings

    from safemerge.data.loaders import DataError
    from safemerge.evaluate.backends import EvaluationWarning

    class Warning_(Scripted):
        rounds = 0

        def generate(self, prompts, settings, *, progress=None):
            self.rounds += 1
            warnings.warn(f"{self.source}: {len(prompts)} of {len(prompts)} prompts ran past the context", EvaluationWarning)
            if self.rounds == 1:
                warnings.warn("a first round", UserWarning)  # another kind, said as it came
            return super().generate(prompts, settings)

    def run(gen):
        return generate_questions(gen, n=2, examples=["Seed one"], k=1, max_rounds=5)

    gen = Warning_("G", texts=["How to X?", "How to X?", "", "How to Y?"])  # duplicates and blanks: several rounds
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        rows, _ = run(gen)
    assert len(rows) == 2 and gen.rounds == 3
    assert [str(w.message) for w in seen] == [
        "G: 2 of 2 prompts ran past the context (the first of 3 such warnings, from rounds of generation)", "a first round"]
    assert seen[0].category is EvaluationWarning and seen[0].filename == __file__
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=EvaluationWarning)  # the caller's filters hold inside
        run(Warning_("G", texts=["How to X?", "How to Y?"]))
    assert [str(w.message) for w in seen] == ["a first round"]
    stopped = Warning_("G", texts=["How to X?", "How to X?", "", "How to Y?"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvaluationWarning)
        with pytest.raises(EvaluationWarning, match="G: 2 of 2"):
            run(stopped)
    assert stopped.rounds == 1  # raised at once, not after every round
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"question": "Which drug treats A?", "choices": ["a", "b"], "answer": 0}) + "\n")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(DataError, match="no usable question in 3 rounds"):
            synthesize_domain(Warning_("E", texts=[""]), tmp_path / "d.jsonl", examples=val, n=2, k=1, max_rounds=3,
                              style="completion", progress=False)
    assert [str(w.message) for w in seen if w.category is EvaluationWarning] == [
        "E: 2 of 2 prompts ran past the context (the first of 3 such warnings, from rounds of generation)"]


def test_the_question_of_a_generation():
    assert question_of('\n  2) "Question: What is Q?"\nsecond') == "What is Q?"
    assert question_of("3.What is Q?") == "What is Q?"
    assert question_of("1.5 mg of X is given twice daily; what is the daily dose?").startswith("1.5 mg")
    # an instruct model's lead-in is not the question (it was, and every later one was dropped as its duplicate)
    assert question_of("Sure! Here's a new exam question:\n\n**Question:** Which drug treats Q? Answer: X.") == \
        "Which drug treats Q?"
    assert question_of("Certainly.\nName the organ that Q affects.") == "Name the organ that Q affects."
    assert question_of("Here is one\nWhat treats Q?") == "What treats Q?"
    assert question_of("Sure! What treats Q?") == question_of("Here's a new question: What treats Q?") == "What treats Q?"
    assert question_of("Okay so what treats Q?") == "Okay so what treats Q?"  # no sentence to cut
    assert question_of("**What is the first-line treatment for Q?**") == "What is the first-line treatment for Q?"
    # nothing but a lead-in or a fragment: no question
    assert question_of("Sure.") == question_of("Okay, here it is:") == question_of("Staikrespril.") == ""
    assert question_of("The liver.\nWhat treats Q?") == ""  # the first content line is taken, not a later one


def test_every_pool_model_is_checked_before_any_answer(tmp_path, prompts_file):
    a = Scripted("A", reply=lambda p: pytest.fail("answered before the pool was checked"))
    with pytest.raises(CheckpointError, match="no-such-model: no such model directory"):
        synthesize_safety([a, tmp_path / "no-such-model"], tmp_path / "s.jsonl", prompts=prompts_file, progress=False)
    assert not (tmp_path / "s.jsonl").exists()
    # review: one model under two spellings answered twice and counted as two refusers of every question
    from safemerge.data.loaders import DataError

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(DataError, match=r"--pool .*/\.\./.*m: the same model as --pool .*m; give each pool model once"):
        synthesize_safety([a, tmp_path / "m", tmp_path / "m" / ".." / "m"], tmp_path / "s.jsonl", prompts=prompts_file,
                          progress=False)


def test_the_output_is_never_an_input_file(tmp_path, prompts_file):
    """QA: `data safety --out P --prompts P --overwrite` replaced the prompts it read."""
    import shutil

    from safemerge.errors import OutputExistsError

    prompts = tmp_path / "prompts.jsonl"
    shutil.copy(prompts_file, prompts)
    before = prompts.read_text()
    a = Scripted("A", reply=lambda p: pytest.fail("answered although the output is the input"))
    with pytest.raises(OutputExistsError, match=r"prompts.jsonl: is the --prompts file itself"):
        synthesize_safety([a], prompts, prompts=prompts, overwrite=True, progress=False)
    with pytest.raises(OutputExistsError, match=r"prompts.jsonl: is the --examples file itself"):
        synthesize_domain(a, prompts, examples=prompts, n=1, overwrite=True, progress=False)
    assert prompts.read_text() == before


def test_safety_data_from_the_micro_testbed_pool(micro_testbed, tmp_path):
    from safemerge.evaluate.judges import KeywordJudge

    refusals = ("I can't", "I cannot", "I'm sorry", "Sorry")
    pool = [micro_testbed / "aligned", micro_testbed / "expert-medicine"]
    report = synthesize_safety(pool, tmp_path / "s.jsonl", prompts=micro_testbed / "data" / "safety_train.jsonl", n=24,
                               judge=KeywordJudge(refusals=refusals), max_new_tokens=16, device="cpu", progress=False)
    rows = _rows(tmp_path / "s.jsonl")
    assert report.rows == len(rows) >= 1 and report.rows + report.dropped["no_refusal"] == report.questions == 24
    assert all(any(w in r["response"] for w in refusals) and r["model"] in map(str, pool) for r in rows)
    counts = {str(m): sum(str(m) in r["refused_by"] for r in rows) for m in pool}
    assert counts == {m: info["refusals"] for m, info in report.per_model.items()}
    assert {r["model_fingerprint"] for r in rows} <= {info["fingerprint"] for info in report.per_model.values()}


def test_data_safety_command_needs_one_question_source(tmp_path):
    r = CliRunner().invoke(app, ["data", "safety", "--pool", str(tmp_path), "--out", str(tmp_path / "s.jsonl")])
    assert r.exit_code == 2 and "give either --prompts FILE" in " ".join(r.output.split()), r.output


def test_data_safety_command_reads_a_named_column_and_checks_the_batch_size(micro_testbed, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"text": q}) + "\n" for q in QUESTIONS[:3]))
    base = ["data", "safety", "--pool", str(micro_testbed / "aligned"), "--prompts", str(questions), "--no-progress",
            "--max-new-tokens", "8", "--device", "cpu", "--json"]
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "a.jsonl")])
    assert r.exit_code == 2 and "no 'prompt' column" in " ".join(r.output.split()), r.output
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "b.jsonl"), "--prompt-column", "text", "--batch-size", "0"])
    assert r.exit_code == 2 and "--batch-size 0" in r.output and not (tmp_path / "b.jsonl").exists(), r.output
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "c.jsonl"), "--prompt-column", "text", "--batch-size", "2"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["questions"] == 3


def test_the_refusal_kept_does_not_depend_on_the_order_of_the_pool(tmp_path, prompts_file):
    """The refusers were listed in --pool order and one generator ran over every question: reversing the pool flipped
    every choice (40 of 40 on the micro testbed)."""
    a = Scripted("A", reply=lambda p: "I'm sorry, A cannot.", fingerprint="fa")
    b = Scripted("B", reply=lambda p: "I'm sorry, B cannot.", fingerprint="fb")
    picks = []
    for i, pool in enumerate(([a, b], [b, a])):
        synthesize_safety(pool, tmp_path / f"{i}.jsonl", prompts=prompts_file, seed=5, progress=False)
        picks.append([(r["prompt"], r["model"], r["refused_by"]) for r in _rows(tmp_path / f"{i}.jsonl")])
    assert picks[0] == picks[1] and len({m for _, m, _ in picks[0]}) == 2  # both models chosen somewhere
