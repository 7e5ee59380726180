"""The streaming merge engine: one output tensor (or row chunk) at a time, bounded memory.

The loop is plain: for each output tensor, fetch the inputs, resolve the parameters, call the method,
write. Threads wrap it: a reader that prefetches the next inputs, one compute thread per core (each
merging a different tensor, torch single-threaded inside it, so that the parts of a method that torch
does not parallelise, such as TIES's top-k selection, still use every core), and the calling thread,
which appends finished tensors to the output shards in the planned order. Tensors of element-wise
methods that are larger than `chunk_elements` are processed in row chunks, so peak memory is a few
chunks, not a model; inside a method the arithmetic runs in cache-sized blocks (methods/blocks.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import queue
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from safemerge._args import check_arguments, parse_size
from safemerge import chat_templates
from safemerge._progress import transient_progress
from safemerge.checkpoint import Checkpoint, atomic_output, name_alike, nonfinite
from safemerge.config import DTYPES, VOCAB_KEYWORDS, MergeConfig, absolute_refs, load_config, method_params
from safemerge.errors import CheckpointError, ConfigError
from safemerge.layout import (
    before_stack,
    layer_index,
    num_layers,
    per_layer_lists,
    position,
    set_num_layers,
    stack_prefix,
    stream_order,
    tied_source,
    with_layer,
)
from safemerge.lora import open_model
from safemerge.methods import MethodSpec, get_method
from safemerge.methods.blocks import TaskVector
from safemerge.vocab import VocabPlan, source_folder, vocab_plan, write_vocab_size
from safemerge.writer import (
    TOKENIZER_FILES,
    ShardedWriter,
    check_side_files,
    copy_custom_code,
    copy_side_files,
    write_config,
    write_model_card,
)

DEFAULT_SHARD = 5 * 1000**3
KWARG = {"lambda": "lambda_"}


# -- one tensor ---------------------------------------------------------------------------------------
def tensor_seed(seed: int, name: str) -> int:
    """The per-tensor random seed: independent of thread order and of the other tensors."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little") >> 1


def merge_tensor(config: MergeConfig, *, name: str, t: float, tensors: dict[str, torch.Tensor],
                 out: torch.Tensor | None = None, model_names: dict[str, str] | None = None) -> torch.Tensor:
    """Merge one tensor: `tensors` maps each input model (as named in the config) to its values (any
    float dtype; they are not modified). The arithmetic is float32; the result goes into `out` (any
    dtype, same shape) or comes back as float32. This is the one place that turns a config into a method
    call; the streaming engine and the in-memory search both go through it.
    """
    spec = get_method(config.merge_method)
    try:
        return _call(spec, config, name=name, t=t, tensors=tensors, out=out, model_names=model_names)
    except ConfigError:  # already names the tensor
        raise
    except ValueError as e:  # a method's own check of its parameters (della's density ± epsilon, rescale_mode, ...)
        raise ConfigError(f"{config.merge_method}, tensor {name}: {e}") from None


def _call(spec: MethodSpec, config: MergeConfig, *, name: str, t: float, tensors: dict[str, torch.Tensor],
          out: torch.Tensor | None, model_names: dict[str, str] | None) -> torch.Tensor:
    glob, per = method_params(config, tensor=name, t=t, model_names=model_names)
    kwargs: dict[str, Any] = {KWARG.get(k, k): v for k, v in glob.items()}
    kwargs["out"] = out
    if spec.random:
        device = next(iter(tensors.values())).device
        kwargs["generator"] = torch.Generator(device=device).manual_seed(tensor_seed(config.seed, name))
    model_kw = {k if k != "weight" else "weights": v for k, v in per.items()}
    if spec.inputs == "models":
        return spec.fn([tensors[m.model] for m in config.models], **model_kw, **kwargs)
    if spec.inputs == "base_optional":
        base = tensors[config.base_model] if config.base_model else None
        return spec.fn(base, [tensors[m.model] for m in config.others()], **model_kw, **kwargs)
    base = tensors[config.base_model]
    others = [tensors[m.model] for m in config.others()]
    if spec.inputs == "pair":
        return spec.fn(base, others[0], **kwargs)
    if spec.inputs == "stock":
        return spec.fn(base, others, **kwargs)
    deltas = [TaskVector(model=o) for o in others]  # τ_i = θ_i − θ_base, formed block by block
    return spec.fn(base, deltas, **model_kw, **kwargs)


# -- the plan -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Item:
    name: str
    start: int
    stop: int


@dataclass(frozen=True)
class _Route:
    """Where one output tensor comes from: the (whole-model or slice) config that merges it, the tensor's name
    in each model it reads, and its layer position t."""
    config: MergeConfig
    sources: dict[str, str]
    t: float
    model_names: dict[str, str] | None = None  # each source's own name of a layer tensor (its per-model filters match it)


@dataclass
class _Plan:
    config: MergeConfig
    spec: MethodSpec
    models: dict[str, Checkpoint]
    reference: Checkpoint
    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    out_dtype: dict[str, torch.dtype]
    routes: dict[str, _Route]
    out_config: dict
    vocab: VocabPlan | None = None  # the embeddings' re-indexing where the vocabularies differ (safemerge.vocab)

    def items(self, chunk_elements: int) -> Iterator[_Item]:
        for name in self.names:
            shape = self.shapes[name]
            rows = shape[0] if shape else 1
            row_elems = max(1, _numel(shape) // max(rows, 1))
            step = rows
            if self.spec.elementwise and shape and _numel(shape) > chunk_elements and not self.reindexed(name):
                step = max(1, chunk_elements // row_elems)
            if rows == 0:  # an empty tensor: one empty item (the writer plans its 0 bytes)
                yield _Item(name, 0, 0)
                continue
            for start in range(0, rows, step):
                yield _Item(name, start, min(rows, start + step))

    def reindexed(self, name: str) -> bool:
        return _reindexed(self.vocab, name)


def _reindexed(vocab: VocabPlan | None, name: str) -> bool:
    """Whether `name` is a vocabulary tensor re-indexed to the output's token ids (read and merged whole)."""
    return vocab is not None and name in vocab.tensors


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _plan(config: MergeConfig, *, allow_pickle: bool) -> _Plan:
    spec = get_method(config.merge_method)
    models = {m: open_model(m, allow_pickle=allow_pickle) for m in config.input_models()}
    name_alike(models.values())
    reference = models[config.base_model or config.models[0].model]
    _check_not_quantized(models)
    sliced = config.slices is not None
    routes = _slice_routes(config, models, reference) if sliced else _whole_routes(config, models, reference)
    names = list(routes)
    vocab = vocab_plan(config.vocab_source, config.vocab_padding, models=models, base_model=config.base_model,
                       routes={n: r.sources for n, r in routes.items()},
                       bases={n: r.config.base_model for n, r in routes.items()}, dtype=DTYPES.get(config.dtype or ""),
                       tokens=config.vocab_tokens)
    shapes, out_dtype = {}, {}
    fixed = DTYPES.get(config.out_dtype or config.dtype or "")
    ref_names = set(reference.names()) if sliced else set()
    for name, route in routes.items():
        first, first_src = next(iter(route.sources.items()))
        shapes[name] = models[first].shape(first_src)
        # the base's dtype for the tensor: in a sliced merge, for a layer's tensor, the base's of its first layer (each
        # slice's first source is another model, and a bf16 slice beside a float32 one would mix them in one file)
        kind = with_layer(name, 0) if sliced and layer_index(name) is not None else name
        out_dtype[name] = fixed or (reference.dtype(kind) if kind in ref_names else models[first].dtype(first_src))
        reindexed = _reindexed(vocab, name)
        for model, src in route.sources.items():
            a, b = shapes[name], models[model].shape(src)
            if (a[1:] != b[1:]) if reindexed else (a != b):  # re-indexed tensors differ in their rows
                vocab_rows = "embed" in name or "lm_head" in name or "wte" in name
                hint = (" — the models differ in more than their vocabularies (the width of each row: the hidden size); "
                        "only models of one architecture can be merged" if a[1:] != b[1:] else
                        " — the models have different vocabularies; set `tokenizer_source: base` (or a model, or "
                        "`union`) to merge their embeddings token by token, as mergekit does") if vocab_rows else ""
                theirs = "" if src == first_src else f" {first_src!r}"
                raise CheckpointError(f"{model}: tensor {src!r} has shape {list(b)} but {models[first].path}{theirs} "
                                      f"has {list(a)}{hint}")
        if reindexed:
            shapes[name] = (vocab.size, *shapes[name][1:])
    out_config = _sliced_config(config, models, reference) if sliced else _whole_config(reference, models)
    if vocab is not None:
        out_config = write_vocab_size(out_config, vocab.size)
    return _Plan(config, spec, models, reference, names, shapes, out_dtype, routes, out_config, vocab)


def _source(model: str, ckpt: Checkpoint, name: str, owner: Path) -> str:
    """The name of output tensor `name` in a model: itself, or the embedding a tied lm_head reads."""
    src = name if name in ckpt else tied_source(name, ckpt.names())
    if src is None:
        raise CheckpointError(f"{model}: tensor {name!r} is missing (it is in {owner}); "
                              "the models must share one architecture")
    return src


def _whole_config(reference: Checkpoint, models: dict[str, Checkpoint]) -> dict:
    """The reference's config.json; where it has none (a base saved as bare weights), the first other input's that has
    one, said in a warning: every input carries the reference's tensors (names and shapes checked), so that config
    describes the output as well."""
    if reference.config.get("model_type"):
        return reference.config
    other = next((c for c in models.values() if c is not reference and c.config.get("model_type")), None)
    if other is None:
        return reference.config
    warnings.warn(f"{reference.path}: has no config.json (or one without model_type); the output's config.json is "
                  f"{other.path}'s",
                  UserWarning, stacklevel=4)
    return other.config


def _check_not_quantized(models: dict[str, Checkpoint]) -> None:
    """Quantized checkpoints (GPTQ, AWQ, bitsandbytes: a `quantization_config`) hold integer weights that merging
    would leave out while merging their scales: refused by name, before anything is read."""
    for model, ckpt in models.items():
        q = ckpt.config.get("quantization_config")
        if q:
            how = q.get("quant_method", "quantized") if isinstance(q, dict) else "quantized"
            raise ConfigError(f"{model}: a {how} checkpoint (config.json has quantization_config); merges compute on "
                              "floating-point weights: merge the unquantized model (or dequantize it first) and "
                              "quantize the merge")


def _left_out(model: str, ckpt: Checkpoint, reference: Checkpoint, known: set[str]) -> None:
    """Warn about what of `model` the output will not have: tensors the reference lacks (a trained lm_head of an
    untied model when the reference ties its head to its embeddings among them), and integer tensors."""
    unknown = [n for n in ckpt.names() if n not in known and ckpt.dtype(n).is_floating_point]
    heads = _head_left_out(model, ckpt, reference, unknown)
    extra = [n for n in unknown if n not in heads]
    if extra:
        warnings.warn(f"{model}: {len(extra)} tensor(s) that {reference.path} lacks are left out of the merge "
                      f"(e.g. {extra[0]!r}); the output has the tensors of {reference.path}", stacklevel=5)
    ints = [n for n in ckpt.names() if not ckpt.dtype(n).is_floating_point]
    if ints and ckpt is reference:
        warnings.warn(f"{reference.path}: {len(ints)} non-floating-point tensor(s) are left out of the output (e.g. "
                      f"{ints[0]!r}, {str(ckpt.dtype(ints[0])).replace('torch.', '')}); merges compute on floating-point "
                      "weights", stacklevel=5)


def _head_left_out(model: str, ckpt: Checkpoint, reference: Checkpoint, unknown: list[str]) -> list[str]:
    """The lm_head among `unknown` (tensors of `model` the output lacks) that a reference tying its head to its
    embeddings stands in for, with a warning where `model` does not tie its own."""
    ref_names = reference.names()
    heads = [n for n in unknown if n.endswith("lm_head.weight") and tied_source(n, ref_names)]
    if heads and ckpt is not reference and ckpt.config.get("tie_word_embeddings") is not True:
        warnings.warn(f"{model}: its own {heads[0]!r} is left out: {reference.path} ties its output layer to its "
                      "embeddings, so the output does too and merges the embeddings only; to merge the output layers, "
                      f"give a base with an untied lm_head (or make {model} the base)", stacklevel=6)
    return heads


def _whole_routes(config: MergeConfig, models: dict[str, Checkpoint], reference: Checkpoint) -> dict[str, _Route]:
    names = stream_order(n for n in reference.names() if reference.dtype(n).is_floating_point)
    n_layers = num_layers(names, reference.config)
    routes = {n: _Route(config, {m: _source(m, c, n, reference.path) for m, c in models.items()}, position(n, n_layers))
              for n in names}
    known = set(names)
    for model, ckpt in models.items():
        _left_out(model, ckpt, reference, known)
    return routes


def _slice_routes(config: MergeConfig, models: dict[str, Checkpoint], reference: Checkpoint) -> dict[str, _Route]:
    """mergekit's layer plan: the tensors before the stack merged as the first slice merges, the layers slice by
    slice (output layer L from layer start + k of every source, t = k / (slice length − 1)), the tensors after
    the stack as the last slice merges (both outside tensors at t = 0, as in mergekit)."""
    configs = [config.slice_config(i) for i in range(len(config.slices))]
    stacks = {stack_prefix(n) for n in reference.names()} - {None}
    if len(stacks) > 1:
        raise ConfigError(f"{reference.path} has {len(stacks)} layer stacks ({', '.join(sorted(stacks))}), e.g. a vision "
                          "tower beside the language model; slices that stack or cut layers need one (mergekit asks for "
                          "its `modules:` syntax here, which safemerge does not read)")

    def outside(names: list[str], cfg: MergeConfig) -> dict[str, _Route]:
        return {n: _Route(cfg, {m: _source(m, models[m], n, reference.path) for m in cfg.input_models()}, 0.0)
                for n in names}

    rest = [n for n in stream_order(reference.names()) if layer_index(n) is None and reference.dtype(n).is_floating_point]
    routes = outside([n for n in rest if before_stack(n)], configs[0])
    by_layer: dict[str, dict[int, list[str]]] = {}  # each slice's first source: its float tensors per layer, read once
    for piece in config.slices:
        model = piece.sources[0].model
        if model not in by_layer:
            by_layer[model] = {}
            for n in stream_order(models[model].names()):
                if layer_index(n) is not None and models[model].dtype(n).is_floating_point:
                    by_layer[model].setdefault(layer_index(n), []).append(n)
    layer = 0
    for i, (piece, cfg) in enumerate(zip(config.slices, configs)):
        routes.update(_layer_routes(i, piece, cfg, models, by_layer[piece.sources[0].model], first_layer=layer))
        layer += piece.length
    routes.update(outside([n for n in rest if not before_stack(n)], configs[-1]))
    ref_names = reference.names()
    for model in configs[-1].input_models():  # the tensors after the stack come from the last slice's models
        _head_left_out(model, models[model], reference, [n for n in models[model].names() if n not in ref_names])
    return routes


def _layer_routes(i: int, piece, cfg: MergeConfig, models: dict[str, Checkpoint], names_of: dict[int, list[str]], *,
                  first_layer: int) -> dict[str, _Route]:
    """The output layers first_layer, first_layer + 1, ... of slice i; `names_of` lists its first source's tensors
    per layer."""
    for j, src in enumerate(piece.sources):
        start, stop = src.layer_range
        count = num_layers(models[src.model].names(), models[src.model].config)
        if stop > count:
            raise ConfigError(f"slices[{i}].sources[{j}] ({src.model}): layer_range [{start}, {stop}] goes past its "
                              f"{count} layers; a range is [start, stop) within [0, {count}]")
    first = piece.sources[0]
    template = models[first.model]
    routes = {}
    for k in range(piece.length):
        t = k / (piece.length - 1) if piece.length > 1 else 1.0
        if not names_of.get(first.layer_range[0] + k):  # else the output layer would be missing (random when loaded)
            raise CheckpointError(f"slices[{i}].sources[0] ({first.model}): its weights hold no tensor of layer "
                                  f"{first.layer_range[0] + k}, though its config.json counts "
                                  f"{num_layers((), template.config)} layers; the checkpoint is incomplete")
        for name in names_of.get(first.layer_range[0] + k, []):
            own = {src.model: with_layer(name, src.layer_range[0] + k) for src in piece.sources}
            sources = {m: _source(m, models[m], n, template.path) for m, n in own.items()}
            routes[with_layer(name, first_layer + k)] = _Route(cfg, sources, t, own)
    return routes


def _sliced_config(config: MergeConfig, models: dict[str, Checkpoint], reference: Checkpoint) -> dict:
    """The reference's config.json with the output's layer count, and its per-layer lists (`layer_types`, SmolLM3's
    `no_rope_layers`, ...) taken layer by layer from the model each output layer comes from (mergekit leaves them
    as they were); a list that a slice's model lacks is dropped."""
    lists: dict[str, list | None] = {name: [] for name in per_layer_lists(reference.config)}
    for piece in config.slices:
        first = piece.sources[0]
        have = per_layer_lists(models[first.model].config)
        for name in lists:
            if lists[name] is not None and name in have:
                lists[name] += have[name][first.layer_range[0]:first.layer_range[1]]
            else:
                lists[name] = None
    return set_num_layers(reference.config, sum(p.length for p in config.slices), lists)


# -- the streaming loop -------------------------------------------------------------------------------
_DONE = object()


def _read(plan: _Plan, item: _Item, device: str, allow_nonfinite: bool) -> dict[str, torch.Tensor]:
    out = {}
    whole = plan.reindexed(item.name)
    for model, src in plan.routes[item.name].sources.items():
        x = plan.models[model].get(src) if whole else plan.models[model].get_rows(src, item.start, item.stop)
        if device != "cpu":
            x = x.to(device=device, non_blocking=True)
        if nonfinite(x):
            msg = f"{model}: tensor {item.name!r} contains NaN or Inf"
            if not allow_nonfinite:
                raise CheckpointError(msg + "; fix the checkpoint, or pass --allow-nonfinite "
                                      "(allow_nonfinite=True) to merge anyway")
            warnings.warn(msg, stacklevel=2)
        out[model] = x
    return plan.vocab.permute(item.name, out) if whole else out


def reuse_freed_memory() -> None:
    """For a process that only merges (the CLI): glibc's malloc then serves tensor-sized blocks from its heap
    and keeps freed ones for the next tensor, instead of mapping fresh pages for every tensor read (page
    faults and zeroing: about 0.3 s of a 5 s task_arithmetic merge of a 0.84B family, benchmarks.md).
    Peak RSS still follows the tensors in flight. Process-wide, so the Python API does not call it; a
    no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return
    mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks up to 1 GiB come from the heap
    mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD (a C int): freed heap memory up to 1 GiB stays for reuse


def check_device(device: str) -> str:
    """`device` if the engine can compute there (cpu, cuda, cuda:N with a GPU present; "auto": cuda when torch sees a
    GPU, else cpu), else a ConfigError that says what is accepted."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r}: merging computes on cpu or cuda (cuda:N for one of several GPUs), or auto")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return device


def default_workers(device: str) -> int:
    """Tensors merged at once: one per core on the CPU (each single-threaded), one on a GPU."""
    if device != "cpu":
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, torch.get_num_threads(), 8))


class _Pipeline:
    """Reader → `workers` compute threads → this thread, which writes the results in the planned order.

    A semaphore bounds the items between reading and writing (workers + 2), so peak memory is a few
    tensors whatever the model size. Any thread's exception stops the others and is raised here.
    """

    def __init__(self, plan: _Plan, *, device: str, chunk_elements: int, allow_nonfinite: bool, workers: int):
        self.plan, self.device, self.workers = plan, device, workers
        self.stop = threading.Event()
        self.slots = threading.Semaphore(workers + 2)
        self.inbox: queue.Queue = queue.Queue()
        self.done: dict[int, tuple[str, torch.Tensor]] = {}
        self.cond = threading.Condition()
        self.errors: list[BaseException] = []
        self.items = list(plan.items(chunk_elements))
        self.allow_nonfinite = allow_nonfinite

    def _acquire(self) -> bool:
        while not self.stop.is_set():
            if self.slots.acquire(timeout=0.1):
                return True
        return False

    def read(self) -> None:
        for seq, item in enumerate(self.items):
            if not self._acquire():
                return
            self.inbox.put((seq, item, _read(self.plan, item, self.device, self.allow_nonfinite)))
        for _ in range(self.workers):
            self.inbox.put(_DONE)

    def compute(self) -> None:
        while not self.stop.is_set():
            try:
                got = self.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if got is _DONE:
                return
            seq, item, tensors = got
            ref = next(iter(tensors.values()))
            merged = torch.empty(ref.shape, dtype=self.plan.out_dtype[item.name], device=ref.device)
            route = self.plan.routes[item.name]
            merge_tensor(route.config, name=item.name, t=route.t, tensors=tensors, out=merged,
                         model_names=route.model_names)  # its errors name the tensor
            if not self.allow_nonfinite and nonfinite(merged):  # finite inputs, but the weights overflow the dtype
                raise CheckpointError(f"tensor {item.name!r}: the merge gives NaN or Inf in {merged.dtype}, the output "
                                      "dtype (a result that does not fit it, e.g. float16 above 65504, or a weight, "
                                      "scale or lambda too large); check the config's numbers and dtype/out_dtype, or "
                                      "pass --allow-nonfinite (allow_nonfinite=True) to write it anyway")
            del tensors, ref
            with self.cond:
                self.done[seq] = (item.name, merged.cpu())
                self.cond.notify_all()

    def _guard(self, target):
        def run():
            try:
                target()
            except BaseException as e:  # reported to the writing thread
                with self.cond:
                    self.errors.append(e)
                    self.stop.set()
                    self.cond.notify_all()
        return run

    def run(self, writer: ShardedWriter, progress) -> None:
        threads = [threading.Thread(target=self._guard(self.read), daemon=True)]
        threads += [threading.Thread(target=self._guard(self.compute), daemon=True) for _ in range(self.workers)]
        for th in threads:
            th.start()
        try:
            for seq in range(len(self.items)):
                with self.cond:
                    while seq not in self.done and not self.errors:
                        if not any(th.is_alive() for th in threads):
                            raise RuntimeError("the merge threads stopped unexpectedly")
                        self.cond.wait(timeout=0.1)
                    if self.errors:
                        raise self.errors[0]
                    name, tensor = self.done.pop(seq)
                writer.write(name, tensor)
                self.slots.release()
                progress(tensor.numel() * tensor.dtype.itemsize)
                del tensor
        finally:
            self.stop.set()
            for th in threads:
                th.join(timeout=5)


def _stream(plan: _Plan, writer: ShardedWriter, *, device: str, chunk_elements: int, allow_nonfinite: bool,
            progress, workers: int) -> None:
    pipe = _Pipeline(plan, device=device, chunk_elements=chunk_elements, allow_nonfinite=allow_nonfinite,
                     workers=workers)
    threads = torch.get_num_threads()
    if workers > 1:
        torch.set_num_threads(1)  # parallel across tensors instead of inside each op
    try:
        pipe.run(writer, progress)
    finally:
        torch.set_num_threads(threads)


# -- public entry point -------------------------------------------------------------------------------
def merge(
    config: str | os.PathLike | dict | MergeConfig,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
    allow_nonfinite: bool = False,
    max_shard_size: int | str = DEFAULT_SHARD,
    chunk_elements: int = 1 << 24,
    workers: int | None = None,
    progress: bool = True,
    title: str | None = None,
    card_extra: str | None = "",
    ignore_unknown: bool = False,
) -> Path:
    """Merge the models of a mergekit-style config into a complete HF checkpoint at `out_dir`.

    Computes in float32 on `device` ("cpu" or "cuda") and casts each tensor once to `out_dtype`
    (else `dtype`, else the base model's). The output appears at `out_dir` only when complete. `max_shard_size`:
    bytes, or a text such as "5GB".
    `workers` tensors are merged at once (default: one per core on the CPU, one on a GPU); with more
    than one, torch runs single-threaded inside each for the duration of the merge. `ignore_unknown`: keys and
    parameters safemerge does not know are left out with a warning (as mergekit ignores them) instead of errors.
    """
    check_arguments(merge, locals())
    cfg = load_config(config, ignore_unknown=ignore_unknown)
    device = check_device(device)
    max_shard_size = parse_size(max_shard_size)
    if workers is not None and workers < 1:
        raise ConfigError(f"workers={workers}: give at least one worker (or None: one per core on the CPU, one on a GPU)")
    plan = _plan(cfg, allow_pickle=allow_pickle)
    tok_dirs = tokenizer_dirs(cfg)
    check_apart(out_dir, input_dirs(plan.models.values()) + tok_dirs)
    tok_path = check_copied_files(cfg, plan.reference.path)
    if not plan.out_config.get("model_type"):
        ref = plan.reference.path
        lacks = "has no config.json" if ref.is_dir() and not (ref / "config.json").exists() else "gives no model config (model_type)"
        warnings.warn(f"{ref}: {lacks}, so the merged folder will hold weights that transformers cannot load by themselves; "
                      "copy the model's config.json into it (or merge models saved with save_pretrained)", UserWarning,
                      stacklevel=2)
    specs = [(n, plan.shapes[n], plan.out_dtype[n]) for n in plan.names]
    with atomic_output(out_dir, overwrite=overwrite) as tmp, _progress(progress, plan, specs) as advance:
        writer = ShardedWriter(tmp, specs, max_shard_bytes=max_shard_size)
        try:
            _stream(plan, writer, device=device, chunk_elements=chunk_elements, allow_nonfinite=allow_nonfinite,
                    progress=advance, workers=workers or default_workers(device))
            writer.finish()
        finally:
            writer.abort()
        _finish(tmp, cfg, plan, tok_path=tok_path, title=title, card_extra=card_extra or "")
    return Path(out_dir).expanduser()


def check_copied_files(cfg: MergeConfig, reference: Path) -> Path:
    """Check the JSON tokenizer and generation files that the output of `cfg` will copy (from the tokenizer source,
    else the `reference` model's folder), before the work of merging rather than after it; returns that folder."""
    tok_path = next(iter(tokenizer_dirs(cfg)), reference)
    check_side_files(tok_path)
    if not (tok_path / "generation_config.json").is_file():  # _finish takes the reference's then
        check_side_files(reference, ("generation_config.json",))
    return tok_path


def input_dirs(models) -> list[Path]:
    """Every folder the checkpoints read (the adapters' of `model+adapter` references too)."""
    return [f for c in models for f in c.folders]


def check_apart(out_dir: str | os.PathLike, inputs: list[Path], *, what: str = "the output",
                kind: str = "input model") -> None:
    """The output must not be an input model's directory, inside one, or around one (nor an input file, or around
    one: `kind`): with --overwrite the merge would replace (or bury) what it reads."""
    out = Path(out_dir).expanduser().resolve()
    for src in inputs:
        src = Path(src).expanduser().resolve()
        how = "is" if out == src else "is inside" if src in out.parents else "contains" if out in src.parents else None
        if how:
            also = f"move the {kind} out of it, or " if how == "contains" and kind != "input model" else ""
            raise ConfigError(f"{out_dir}: {what} {how} the {kind} {src}; {also}write it to another folder")


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / n).is_file() for n in TOKENIZER_FILES)


def tokenizer_dirs(cfg: MergeConfig) -> list[Path]:
    """The tokenizer source when it is another folder than the reference model's ([] for none, 'base' or
    'union'); an error, before any work, when it is not a folder."""
    tok = cfg.vocab_source
    if tok is None or tok in VOCAB_KEYWORDS:
        return []
    folder = source_folder(tok)  # `model+adapter`: the model's
    if not folder.is_dir():
        raise ConfigError(f"tokenizer_source {tok!r} is not a model directory")
    return [folder]


def _finish(tmp: Path, cfg: MergeConfig, plan: _Plan, *, tok_path: Path, title: str | None, card_extra: str) -> None:
    dtypes = set(plan.out_dtype.values())
    main_dtype = (DTYPES.get(cfg.out_dtype or cfg.dtype or "") or (dtypes.pop() if len(dtypes) == 1 else None)
                  or _config_dtype(plan.reference) or plan.reference.float_dtype())  # mixed: what the reference says
    write_config(tmp, plan.out_config, dtype=main_dtype)
    template = chat_templates.resolve(cfg.chat_template, [c.path for c in plan.models.values()])
    # generation_config.json (its EOS ids: an instruct template's end-of-turn token) goes with the tokenizer and chat
    # template: MergeAlign's output speaks the aligned model's template, and a base's EOS ids would not stop its turns
    generation = tok_path if (tok_path / "generation_config.json").is_file() else plan.reference.path
    if plan.vocab is not None and plan.vocab.tokenizer is not None:  # the union's tokenizer
        plan.vocab.tokenizer.save_pretrained(str(tmp))
        copy_side_files(tmp, tokenizer_source=None, generation_source=generation, chat_template=template)
    elif not copy_side_files(tmp, tokenizer_source=tok_path, generation_source=generation, chat_template=template):
        others = [c.path for c in plan.models.values() if _has_tokenizer(c.path)]
        if others:
            warnings.warn(f"{tok_path} has no tokenizer files, so the output has none; set `tokenizer_source: "
                          f"{others[0]}` in the config (mergealign: --tokenizer-source {others[0]}) to take that model's",
                          stacklevel=3)
    copy_custom_code(tmp, [tok_path, plan.reference.path])  # config.json's auto_map names them (trust_remote_code)
    as_yaml = cfg.to_yaml_dict()  # the card shows it as written (absolute paths could name a user's folders)
    reproducible = absolute_refs(as_yaml)  # a path relative to the working folder: from any folder
    (tmp / "mergekit_config.yml").write_text(yaml.safe_dump(reproducible, sort_keys=False))
    inputs = [{"model": m, "fingerprint": c.fingerprint()} for m, c in plan.models.items()]
    write_model_card(tmp, base_model=cfg.base_model, merge_config=as_yaml, inputs=inputs,
                     title=title or f"{cfg.merge_method} merge", extra=card_extra)


def _config_dtype(ckpt: Checkpoint) -> torch.dtype | None:
    """The dtype the checkpoint's config.json names (`dtype`, or the older `torch_dtype`), if a known one."""
    return DTYPES.get(str(ckpt.config.get("dtype") or ckpt.config.get("torch_dtype") or ""))


class _progress:
    """A rich progress bar over output bytes (or nothing), as a context manager yielding `advance`."""

    def __init__(self, enabled: bool, plan: _Plan, specs):
        self.enabled = enabled
        self.total = sum(_numel(s) * d.itemsize for _, s, d in specs)
        self.label = f"{plan.config.merge_method}: {len(plan.names)} tensors"

    def __enter__(self):
        from rich.progress import BarColumn, DownloadColumn, TimeRemainingColumn, TransferSpeedColumn

        self.bar = transient_progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                                      TransferSpeedColumn(), TimeRemainingColumn()) if self.enabled else None
        if self.bar is None:
            return lambda n: None
        self.bar.__enter__()
        task = self.bar.add_task(self.label, total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False
