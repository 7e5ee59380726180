"""Generation backends: one interface, a transformers implementation here and vLLM as an extra.

A backend turns user prompts into responses. It applies the model's chat template (a single user turn,
`add_generation_prompt=True`; a model without one gets the raw prompt and a warning), encodes with
lm-eval's BOS rule (special tokens are added unless the text already starts with the BOS string), and
generates greedily by default. Results are `Generation` records in prompt order, whatever the backend.

The transformers backend sorts prompts by length (longest first) and generates in batches with LEFT
padding, so a batch's prompts end at the same position and the first new token of every row comes
from the same step.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import threading
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

import torch

from safemerge.errors import SafemergeError

if TYPE_CHECKING:
    from safemerge.evaluate.loading import ModelRef


class EvaluationWarning(UserWarning):
    """Something that makes a number less trustworthy (no chat template, unparsed judge outputs)."""


@dataclass(frozen=True)
class GenerationSettings:
    """What changes the responses, besides the model. temperature = 0 means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    system_prompt: str | None = None
    chat_template: bool = True  # apply the model's chat template when it has one

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Generation:
    """One response: its text (special tokens removed), token counts, and whether it stopped on EOS."""

    text: str
    prompt_tokens: int
    new_tokens: int
    finished: bool


@runtime_checkable
class GenerationBackend(Protocol):
    name: str
    fingerprint: str | None  # content hash of the weights; None disables the results store

    def identity(self) -> dict:
        """What else identifies the outputs (dtype, chat template hash, ...), for the store key."""
        ...

    def generate(
        self, prompts: Sequence[str], settings: GenerationSettings, *, progress: Callable[[int], None] | None = None
    ) -> list[Generation]:
        ...


# -- prompt formatting shared by the backends -----------------------------------------------------
# The day every chat template is rendered on. Llama 3.2 and 3.3's templates write "Today Date: <today>" into the
# system turn (transformers' `strftime_now`) unless `date_string` is given, which made a prompt, its answer and a
# stored result depend on the day they were made; 26 Jul 2024 is the date those templates fall back to themselves.
TEMPLATE_DATE = datetime.datetime(2024, 7, 26)
PROMPT_VERSION = 2  # how prompts are rendered and decoded (2: fixed template date, the model's sampling options out)
_TODAY_LOCK = threading.RLock()  # re-entered where a rendering runs inside a training that holds it


@contextmanager
def template_date() -> Iterator[None]:
    """Chat templates rendered inside see TEMPLATE_DATE as today, through `date_string` where they read it and
    through transformers' `strftime_now` where they call it (the renderer's `datetime` is swapped meanwhile)."""
    import transformers.utils.chat_template_utils as ctu

    real = getattr(ctu, "datetime", None)
    if not (isinstance(real, type) and issubclass(real, datetime.datetime)):  # another transformers layout
        yield
        return

    class Fixed(real):  # type: ignore[misc, valid-type]
        @classmethod
        def now(cls, tz=None):
            return TEMPLATE_DATE.replace(tzinfo=tz)

    with _TODAY_LOCK:
        ctu.datetime = Fixed
        try:
            yield
        finally:
            ctu.datetime = real


def chat_text(tokenizer: Any, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    """`tokenizer.apply_chat_template(messages, tokenize=False)` on TEMPLATE_DATE (see `template_date`)."""
    from jinja2 import TemplateError

    with template_date():
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                 date_string=TEMPLATE_DATE.strftime("%d %b %Y"))
        except TemplateError as e:  # a template that does not compile, or one that raises on this conversation
            where = getattr(tokenizer, "name_or_path", None) or "the model"
            raise SafemergeError(f"{where}: its chat template failed on a {'/'.join(m['role'] for m in messages)} "
                                 f"conversation ({type(e).__name__}: {e}); fix `chat_template` in its "
                                 "tokenizer_config.json (or chat_template.jinja)") from None


def render_prompt(tokenizer: Any, prompt: str, *, system_prompt: str | None = None, chat_template: bool = True) -> str:
    """The text the model sees: the chat template applied to one user turn (on TEMPLATE_DATE), or the raw prompt."""
    if not (chat_template and getattr(tokenizer, "chat_template", None)):
        return prompt if system_prompt is None else f"{system_prompt}\n\n{prompt}"
    messages = [{"role": "user", "content": prompt}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return chat_text(tokenizer, messages, add_generation_prompt=True)


def prefix_token_id(tokenizer: Any) -> int | None:
    """lm-eval's prefix token: BOS, else EOS."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None else getattr(tokenizer, "eos_token_id", None)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids with lm-eval's rule (HFLM.tok_encode): special tokens are added unless the text
    already starts with the prefix token's text (BOS, else EOS), so a chat template's BOS is not doubled."""
    prefix = prefix_token_id(tokenizer)
    add = not (prefix is not None and text.startswith(tokenizer.decode([prefix])))
    return list(tokenizer.encode(text, add_special_tokens=add))


def template_hash(tokenizer: Any) -> str | None:
    t = getattr(tokenizer, "chat_template", None)
    return hashlib.blake2b(t.encode(), digest_size=8).hexdigest() if isinstance(t, str) else None


def warn_no_chat_template(source: str) -> None:
    warnings.warn(
        f"{source}: the tokenizer has no chat template; prompts are given to the model as plain text",
        EvaluationWarning,
        stacklevel=3,
    )


# -- batched generation on token ids --------------------------------------------------------------
@dataclass
class TokenOutput:
    tokens: list[int]  # new tokens, cut before the first EOS
    finished: bool
    score: Any = None  # what `score_fn` returned for this row


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for v in (gen_eos, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return sorted(ids)


def pad_id(tokenizer: Any) -> int:
    for v in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(v, int):
            return v
    return 0


@contextmanager
def _without_length_reminder() -> Iterator[None]:
    """transformers logs a "friendly reminder" once a padded batch outgrows max_position_embeddings, whether or not
    any answer does; the backend's own warning counts the answers that did (TransformersBackend._check_context)."""
    import logging

    log = logging.getLogger("transformers.generation.stopping_criteria")

    def keep(record: logging.LogRecord) -> bool:
        return "friendly reminder" not in record.getMessage()

    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


@contextmanager
def _own_settings_only(model: Any) -> Iterator[None]:
    """Generate with our settings alone: transformers fills every field our GenerationConfig leaves unset from the
    model's generation_config.json, so a checkpoint's repetition_penalty, no_repeat_ngram_size, min_new_tokens,
    bad_words_ids or suppress_tokens (Qwen2.5-Instruct ships repetition_penalty 1.05) would bend "greedy" decoding,
    and the vLLM backend, which builds its SamplingParams from our settings, would disagree. The model's own
    config is put back afterwards. (Its EOS ids reach `generate_ids` as `eos`.)"""
    from transformers import GenerationConfig

    own = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = own


@torch.inference_mode()
def generate_ids(
    model: Any,
    sequences: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad: int,
    eos: Sequence[int],
    batch_size: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    score_fn: Callable[[torch.Tensor, list[int]], Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[TokenOutput]:
    """Generate after each token sequence; left-padded batches of similar length, results in input order.

    `score_fn(logits, tokens)` gets the raw logits of each row's generated steps (float32,
    [n_steps, vocab], n_steps = len(tokens) + 1 if it stopped on EOS) and its tokens; only what it
    returns is kept, so the logits of a whole run never sit in memory.
    """
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise SafemergeError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if any(len(s) == 0 for s in sequences):
        raise SafemergeError("cannot generate after an empty prompt (0 tokens)")
    device = next(model.parameters()).device
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,  # explicit neutral values: the model's
        top_p=top_p if temperature > 0 else 1.0,  # generation_config fills only unset (None) fields
        # no top-k cut when sampling (transformers' default 50 is not one of our settings; vLLM's is off); unset when
        # greedy, where transformers would log that a sampling flag is ignored
        top_k=0 if temperature > 0 else None,
        pad_token_id=pad,
        eos_token_id=list(eos) or None,
        output_logits=score_fn is not None,
        return_dict_in_generate=True,
    )
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    results: list[TokenOutput | None] = [None] * len(sequences)
    if temperature > 0:
        torch.manual_seed(seed)
    eos_set = set(eos)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        width = max(len(sequences[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):  # left padding: (B, T) with the prompt flush right
            s = sequences[i]
            ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s) :] = 1
        with _without_length_reminder(), _own_settings_only(model):
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        new = out.sequences[:, width:].tolist()
        logits = torch.stack(out.logits, dim=1).float().cpu() if score_fn is not None else None  # (B, S, V)
        for r, i in enumerate(idx):
            row = new[r]
            cut = next((k for k, t in enumerate(row) if t in eos_set), None)
            tokens = row if cut is None else row[:cut]
            score = score_fn(logits[r, : len(tokens) + (cut is not None)], tokens) if logits is not None else None
            results[i] = TokenOutput(tokens, cut is not None, score)
        if progress:
            progress(len(idx))
    return results  # type: ignore[return-value]


# -- the transformers backend ---------------------------------------------------------------------
class TransformersBackend:
    """Batched generation with a transformers causal LM held in memory (also used for log-likelihoods)."""

    name = "transformers"

    def __init__(self, model: Any, tokenizer: Any, *, fingerprint: str | None = None, batch_size: int = 16, source: str = "<model>",
                 files: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.fingerprint = fingerprint
        self.batch_size = batch_size
        self.source = source
        self._warned = False
        self._files = files  # side_files_digest of `source` (a ModelRef's `files`), else computed once when asked

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: str = "auto",
        dtype: str | torch.dtype = "auto",
        batch_size: int = 16,
        allow_pickle: bool = False,
    ) -> "TransformersBackend":
        from safemerge.evaluate.loading import load_model, model_ref

        ref = model_ref(path, dtype=dtype, allow_pickle=allow_pickle)
        model, tokenizer = load_model(ref.path, device=device, dtype=dtype, allow_pickle=allow_pickle, adapter=ref.adapter)
        return cls(model, tokenizer, fingerprint=ref.fingerprint, batch_size=batch_size, source=ref.source, files=ref.files)

    def __repr__(self) -> str:
        return f"TransformersBackend({self.source!r})"

    def identity(self) -> dict:
        from safemerge.evaluate.loading import side_files_digest

        if self._files is None and Path(self.source).is_dir():
            self._files = side_files_digest(Path(self.source))
        return {"backend": self.name, "dtype": str(self.model.dtype).replace("torch.", ""), "chat_template": template_hash(self.tokenizer),
                "files": self._files}

    def render(self, prompt: str, settings: GenerationSettings) -> str:
        if settings.chat_template and not getattr(self.tokenizer, "chat_template", None) and not self._warned:
            warn_no_chat_template(self.source)
            self._warned = True
        return render_prompt(self.tokenizer, prompt, system_prompt=settings.system_prompt, chat_template=settings.chat_template)

    def generate(
        self, prompts: Sequence[str], settings: GenerationSettings, *, progress: Callable[[int], None] | None = None
    ) -> list[Generation]:
        seqs = [encode(self.tokenizer, self.render(p, settings)) for p in prompts]
        eos = eos_ids(self.model, self.tokenizer)
        self._check_eos(eos, settings.max_new_tokens)
        outs = generate_ids(
            self.model,
            seqs,
            max_new_tokens=settings.max_new_tokens,
            pad=pad_id(self.tokenizer),
            eos=eos,
            batch_size=self.batch_size,
            temperature=settings.temperature,
            top_p=settings.top_p,
            seed=settings.seed,
            progress=progress,
        )
        self._check_context(seqs, outs, settings.max_new_tokens)
        return [
            Generation(self.tokenizer.decode(o.tokens, skip_special_tokens=True), len(s), len(o.tokens), o.finished)
            for s, o in zip(seqs, outs)
        ]

    def _check_eos(self, eos: list[int], max_new_tokens: int) -> None:
        """Warn (the answers are still generated, as asked) when no end-of-sequence token is known, so every
        answer runs to max_new_tokens."""
        if not eos:
            warnings.warn(f"{self.source}: neither the tokenizer nor generation_config.json names an end-of-sequence "
                          f"token, so every answer runs to max_new_tokens ({max_new_tokens})", EvaluationWarning, stacklevel=3)

    def _check_context(self, seqs: Sequence[Sequence[int]], outs: Sequence[Any], max_new_tokens: int) -> None:
        """Warn when a prompt and its answer did outgrow the context the model was trained for (not merely could:
        most answers end long before max_new_tokens)."""
        context = getattr(self.model.config, "max_position_embeddings", None)
        if not isinstance(context, int):
            return
        over = sum(len(s) + len(o.tokens) > context for s, o in zip(seqs, outs))
        if over:
            warnings.warn(f"{self.source}: {over} of {len(seqs)} prompts and their answers ran past the model's context "
                          f"of {context} tokens; those answers are unreliable (the prompts take up to "
                          f"{max(map(len, seqs))} tokens and the answers up to {max_new_tokens}: shorten the prompts, "
                          "or lower max_new_tokens where the command sets it, e.g. --max-new-tokens for answers)",
                          EvaluationWarning,
                          stacklevel=3)


def get_backend(
    model: "ModelRef | str | os.PathLike | GenerationBackend",
    *,
    backend: str = "transformers",
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 16,
    allow_pickle: bool = False,
) -> GenerationBackend:
    """A loaded backend for a model path or ModelRef (a backend passes through; a ModelRef keeps the
    backend it loads, so evaluations sharing the ref load the weights once)."""
    from safemerge.evaluate.loading import ModelRef, load_model, model_ref

    if not isinstance(model, ModelRef):
        if isinstance(model, GenerationBackend):
            return model
        model = model_ref(model, dtype=dtype, allow_pickle=allow_pickle)
    if model.backend is not None and (model.backend.name == backend or model.path is None):
        return model.backend
    if backend == "transformers":
        m, tok = load_model(model.path, device=device, dtype=dtype, allow_pickle=allow_pickle, tokenizer=model.tokenizer,
                            adapter=model.adapter)
        model.backend = TransformersBackend(m, tok, fingerprint=model.fingerprint, batch_size=batch_size, source=model.source,
                                            files=model.files)
    elif backend == "vllm":
        from safemerge.evaluate.vllm_backend import VLLMBackend

        if model.adapter is not None:
            raise SafemergeError(f"{model.source}: the vllm backend reads model folders; evaluate the LoRA expert with the "
                                 "transformers backend, or write it out first (a passthrough merge of that one model)")
        # "auto" is the dtype the store key names (the model's stored one, as transformers loads it), not vLLM's own
        # "auto", which would run a float32 model in float16 under a key that says float32
        model.backend = VLLMBackend(model.path, dtype=model.dtype if dtype == "auto" else dtype, fingerprint=model.fingerprint)
    else:
        raise SafemergeError(f"unknown backend {backend!r}; choose transformers or vllm")
    return model.backend
