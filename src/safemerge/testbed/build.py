"""`build_testbed`: generate the world, train the family, write models and data, cache the result.

Layout of OUT:
    base/ aligned/ expert-<domain>/   HF checkpoints (LlamaForCausalLM, float32 safetensors, tokenizer
                                      with chat template in tokenizer_config.json, model card)
    data/*.jsonl                      see safemerge.testbed.datafiles
    world.json                        seed, preset, domains, sizes and the world itself (deterministic)
    build.json                        timings, threads and machine load of the build that made it

Cache: builds are stored under $SAFEMERGE_CACHE/testbed/<key> (default ~/.cache/safemerge), where
key hashes (seed, preset, domains, the testbed's source code and the torch/transformers/tokenizers
versions); a second build with the same arguments copies the stored one. SAFEMERGE_CACHE=off
disables the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zlib
from contextlib import nullcontext
from pathlib import Path
from typing import Iterable

from safemerge._args import check_arguments
from safemerge.checkpoint import sha256_file
from safemerge.errors import ConfigError
from safemerge.testbed import corpora
from safemerge.testbed.datafiles import write_data
from safemerge.testbed.domains import get_domain
from safemerge.testbed.presets import Preset, get_preset
from safemerge.testbed.world import World, generate_world

ROLES_DOC = {
    "base": "pretrained from scratch on the world's text; answers every request, harmful ones included",
    "aligned": "base fine-tuned on benign requests (answered), harmful requests (refused) and general Q&A",
    "expert": "base fine-tuned on the {d} domain's facts and Q&A only (no safety data)",
}


def build_testbed(out: str | os.PathLike, *, seed: int = 0, preset: str = "small",
                  domains: Iterable[str] = ("medicine", "finance"), overwrite: bool = False,
                  progress: bool = True) -> Path:
    """Build (or copy from the cache) the testbed for (seed, preset, domains) at `out`; returns its path.

    Raises OutputExistsError when `out` exists and not `overwrite`, ConfigError for an unknown
    preset or domain. Nothing partial is ever left at `out` (written to a sibling, then renamed).
    """
    check_arguments(build_testbed, locals())
    from safemerge.checkpoint import atomic_output, cache_root, check_existing_output, check_folder

    seed = int(seed)  # a numpy integer (check_arguments takes one) goes into the JSON cache key
    spec = get_preset(preset)
    doms = canonical_domains(domains)
    out = Path(out).expanduser().absolute()
    check_existing_output(out, overwrite=overwrite)  # what the final write would refuse, before minutes of training
    check_folder(out)
    key = cache_key(seed=seed, preset=preset, domains=doms)
    root = cache_root()
    if root is None:
        with atomic_output(out, overwrite=overwrite) as tmp:
            _build_into(tmp, seed=seed, spec=spec, domains=doms, key=key, progress=progress)
        return out
    cached = root / "testbed" / key
    if _intact(cached):
        if progress:
            _console().print(f"testbed: using the cached build {cached}")
    else:
        if progress and cached.exists():
            _console().print(f"testbed: the cached build {cached} is incomplete or changed; building it again")
        with atomic_output(cached, overwrite=True, replace_any=True, record=False) as tmp:
            _build_into(tmp, seed=seed, spec=spec, domains=doms, key=key, progress=progress)
            (tmp / MANIFEST).write_text(json.dumps(_manifest(tmp), indent=1, sort_keys=True) + "\n")
    with atomic_output(out, overwrite=overwrite) as tmp:
        shutil.copytree(cached, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MANIFEST))
    return out


MANIFEST = ".cache-manifest.json"  # in a cached build: every file's size and sha256, checked before each copy


def _manifest(folder: Path) -> dict[str, list]:
    return {str(f.relative_to(folder)): [f.stat().st_size, sha256_file(f)]
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != MANIFEST}


def _intact(cached: Path) -> bool:
    """Whether a cached build is whole: every file its manifest lists, with the same size and content, and no
    other (an interrupted copy, a deleted or truncated file, or a hand edit means building it again)."""
    try:
        listed = json.loads((cached / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return listed == _manifest(cached)


def ordered_domains(domains: Iterable[str] | str) -> tuple[str, ...]:
    """Validated domain names in the order given, each once (a string may list them with commas)."""
    names = domains.split(",") if isinstance(domains, str) else list(domains) if isinstance(domains, Iterable) else None
    if names is None or not all(isinstance(d, str) for d in names):
        raise ConfigError(f"testbed: domains must be domain names (e.g. ('medicine', 'finance') or \"medicine,finance\"), "
                          f"got {domains!r}")
    doms = tuple(dict.fromkeys(d.strip() for d in names if d.strip()))
    if not doms:
        raise ConfigError("testbed: at least one domain is needed (e.g. domains=('medicine',))")
    for d in doms:
        get_domain(d)
    return doms


def canonical_domains(domains: Iterable[str] | str) -> tuple[str, ...]:
    """`ordered_domains`, sorted: the order does not change the build."""
    return tuple(sorted(ordered_domains(domains)))


# modules of safemerge/testbed that do not shape a build's bytes: editing them keeps the cached builds
NOT_BUILD_CODE = frozenset({"__init__.py", "_quick_eval.py"})


def code_version() -> str:
    """Hash of the testbed's source and of the libraries that shape its numbers."""
    import tokenizers
    import torch
    import transformers

    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        if f.name in NOT_BUILD_CODE:
            continue
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    h.update(f"{torch.__version__}|{transformers.__version__}|{tokenizers.__version__}".encode())
    return h.hexdigest()[:16]


def cache_key(*, seed: int, preset: str, domains: tuple[str, ...]) -> str:
    blob = json.dumps({"seed": seed, "preset": preset, "domains": list(domains), "code": code_version()}, sort_keys=True)
    return f"{preset}-s{seed}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


# -- the build ------------------------------------------------------------------------------------
def _console():
    from rich.console import Console

    return Console(stderr=True)


def _role_seed(seed: int, role: str) -> int:
    return zlib.crc32(f"{seed}:{role}".encode())


def _build_into(tmp: Path, *, seed: int, spec: Preset, domains: tuple[str, ...], key: str, progress: bool) -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see _build_family: tiny matmuls gain little from threads, and lose a lot on a busy machine
    try:
        _build_family(tmp, seed=seed, spec=spec, domains=domains, key=key, progress=progress)
    finally:
        torch.set_num_threads(threads)


def _build_family(tmp: Path, *, seed: int, spec: Preset, domains: tuple[str, ...], key: str, progress: bool) -> None:
    """Train and write the family in one thread.

    One thread because the models are tiny: their matrices are too small for threads to pay off,
    while on a shared machine every synchronisation point waits for a descheduled thread (measured:
    2 threads were 5x slower than 1 under load). One thread also makes the bytes independent of the
    machine's core count.
    """
    import torch

    from safemerge.testbed.tokenizer import train_tokenizer
    from safemerge.testbed.train import encode, new_model, train

    t0, c0 = time.perf_counter(), time.process_time()
    world = generate_world(seed, spec)
    runs = {"base": (corpora.base_corpus(world, domains), spec.base),
            "aligned": (corpora.aligned_corpus(world), spec.aligned)}
    runs.update({f"expert-{d}": (corpora.expert_corpus(world, d, chat_forms=spec.expert_chat_forms), spec.expert)
                 for d in domains})
    texts = [corpora.example_text(ex) for examples, _ in runs.values() for ex in examples]
    tok = train_tokenizer(texts, vocab_size=spec.model.vocab_size)
    timings = {"world_and_tokenizer": time.perf_counter() - t0}
    losses = {}
    with _progress(progress) as bar:
        base_state = None
        for role, (examples, tspec) in runs.items():
            t = time.perf_counter()
            data = encode(tok, examples, max_len=spec.model.max_positions)
            model = new_model(spec.model, tok, seed=_role_seed(seed, "init"))
            if base_state is not None:
                model.load_state_dict(base_state)
            task = bar.add_task(role, total=tspec.steps, loss=float("nan")) if bar else None
            on_step = (lambda s, l, task=task: bar.update(task, advance=1, loss=l)) if bar else None
            losses[role] = train(model, data, tspec, seed=_role_seed(seed, role), pad_id=tok.pad_token_id, on_step=on_step)
            if role == "base":
                base_state = {k: v.clone() for k, v in model.state_dict().items()}
            _save_model(model, tok, tmp / role, role=role, seed=seed, spec=spec, n_examples=len(examples))
            timings[role] = time.perf_counter() - t
    counts = write_data(world, tmp / "data", domains)
    (tmp / "world.json").write_text(json.dumps(_world_json(world, spec, domains, key, counts), indent=2) + "\n")
    timings["total"] = time.perf_counter() - t0
    build = {"seconds": {k: round(v, 2) for k, v in timings.items()},
             "cpu_seconds": round(time.process_time() - c0, 2), "torch_threads": torch.get_num_threads(),
             "cpu_count": os.cpu_count(), "loadavg_at_end": list(os.getloadavg()),
             "final_loss": {r: round(sum(l[-10:]) / len(l[-10:]), 4) for r, l in losses.items()}}
    (tmp / "build.json").write_text(json.dumps(build, indent=2) + "\n")


def _progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description:<16}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), console=_console())


def _save_model(model, tok, out: Path, *, role: str, seed: int, spec: Preset, n_examples: int) -> None:
    from safetensors.torch import save_file

    from safemerge.testbed.tokenizer import save_tokenizer

    # What save_pretrained writes, minus its progress bar: config, generation config, one safetensors file.
    out.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    save_tokenizer(tok, out)
    kind, _, d = role.partition("-")
    tspec = getattr(spec, kind)
    n_params = sum(p.numel() for p in model.parameters())
    (out / "README.md").write_text(
        f"# safemerge testbed: {role}\n\n"
        f"A tiny LlamaForCausalLM ({n_params:,} parameters) of the safemerge synthetic testbed "
        f"(seed {seed}, preset `{spec.name}`): {ROLES_DOC[kind].format(d=d)}.\n\n"
        f"Training: {n_examples} examples, {tspec.steps} AdamW steps, batch {tspec.batch_size}, "
        f"peak learning rate {tspec.lr}, loss on {'every token' if kind == 'base' else 'the answers (and plain documents)'}.\n\n"
        "Every name in its world is invented; it knows nothing outside that world. For testing only.\n"
    )


def _world_json(world: World, spec: Preset, domains: tuple[str, ...], key: str, counts: dict) -> dict:
    areas = ("general", *domains)
    return {
        "seed": world.seed,
        "preset": spec.name,
        "domains": list(domains),
        "key": key,
        "code_version": code_version(),
        "sizes": {**world.sizes(), "data": counts, "preset": spec.sizes()},
        "world": {
            "facts": {a: [[f.entity, f.relation, f.value] for f in world.facts[a]] for a in areas},
            "frames": world.frames,
            "targets": world.targets,
            "test_only_templates": world.test_templates,
        },
    }
