"""Evaluation: safety rate with real judges, multiple-choice domain accuracy, model similarity, audit.

    evaluate_safety(model, *, prompts, judge="keyword", ...)   share of safe responses, per category
    evaluate_domain(model, *, task, format="plain", ...)       acc / acc_norm as lm-evaluation-harness
    similarity(models, *, base=None)                           L2 distances, task-vector cosines
    audit(models, *, safety_prompts, domain_tasks=(), ...)     a pool's table, unsafe models flagged

Interfaces: `GenerationBackend` (TransformersBackend; VLLMBackend with the vllm extra) and `Judge`
(KeywordJudge, LlamaGuardJudge, MDJudge). Every result goes to the results store (safemerge.store).
"""

from safemerge.evaluate.audit import audit
from safemerge.evaluate.backends import (
    EvaluationWarning,
    Generation,
    GenerationBackend,
    GenerationSettings,
    TransformersBackend,
    get_backend,
)
from safemerge.evaluate.domain import evaluate_domain
from safemerge.evaluate.guards import LazyGuard, LlamaGuardJudge, MDJudge, parse_llama_guard, parse_md_judge
from safemerge.evaluate.judges import GCG_REFUSALS, Judge, KeywordJudge, Verdict, get_judge
from safemerge.evaluate.lm_eval_bridge import run_lm_eval
from safemerge.evaluate.loading import ModelRef, model_ref
from safemerge.evaluate.safety import evaluate_safety
from safemerge.evaluate.similarity import similarity

__all__ = [
    "EvaluationWarning", "GCG_REFUSALS", "Generation", "GenerationBackend", "GenerationSettings", "Judge",
    "KeywordJudge", "LazyGuard", "LlamaGuardJudge", "MDJudge", "ModelRef", "TransformersBackend", "Verdict",
    "audit", "evaluate_domain", "evaluate_safety", "get_backend", "get_judge", "model_ref", "parse_llama_guard",
    "parse_md_judge", "run_lm_eval", "similarity",
]
