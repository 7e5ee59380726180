"""A deterministic family of random Llama checkpoints (base + fine-tune-like relatives).

Shared by ``benchmarks/merge_speed.py`` (a ~0.85B bf16 family), ``benchmarks/make_parity_fixtures.py``
and ``tests/test_mergekit_parity.py`` (a tiny family regenerated on the fly, so the repository only
keeps mergekit's outputs). Only torch, safetensors and the standard library are used.

Every tensor is drawn from its own ``torch.Generator`` seeded by ``(seed, role, tensor name)``
(``zlib.crc32``), so a tensor does not depend on the order or the set of other tensors:

    base:      W ~ N(0, init_std²)  for matrices,   g = 1 + N(0, 0.1²)·init_std/0.02 for norms
    relative:  W_r = W_base + delta_scale · std(W_base) · N(0, 1)      (computed in float32)

then each tensor is cast once to ``dtype`` and written as an HF directory (``config.json``,
``model.safetensors`` or shards + ``model.safetensors.index.json``).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LlamaSpec:
    """Shape of a Llama checkpoint; ``num_key_value_heads < num_attention_heads`` gives GQA."""

    hidden_size: int = 32
    num_hidden_layers: int = 4
    vocab_size: int = 128
    intermediate_size: int = 48
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# The benchmark family of issue 2: ~0.85B parameters (TinyLlama-like shapes with 16 layers).
BENCH_SPEC = LlamaSpec(
    hidden_size=2048,
    num_hidden_layers=16,
    vocab_size=32000,
    intermediate_size=5632,
    num_attention_heads=32,
    num_key_value_heads=4,
)


def tensor_shapes(spec: LlamaSpec) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, in HF Llama naming and checkpoint order."""
    h, i, kv = spec.hidden_size, spec.intermediate_size, spec.num_key_value_heads * spec.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, h)}
    for n in range(spec.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (h, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, h)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
    shapes["model.norm.weight"] = (h,)
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    return shapes


def num_params(spec: LlamaSpec) -> int:
    total = 0
    for shape in tensor_shapes(spec).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def hf_config(spec: LlamaSpec, *, dtype: str) -> dict:
    """A ``config.json`` that transformers and mergekit read as ``LlamaForCausalLM``."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": dtype,
    }


def _generator(seed: int, role: str, name: str) -> torch.Generator:
    key = zlib.crc32(f"{seed}/{role}/{name}".encode())
    return torch.Generator().manual_seed(key)


def _base_tensor(name: str, shape: tuple[int, ...], *, seed: int, init_std: float) -> torch.Tensor:
    noise = torch.randn(shape, generator=_generator(seed, "base", name), dtype=torch.float32)
    if len(shape) == 1:  # RMSNorm gains sit around 1
        return 1.0 + noise * (0.1 * init_std / 0.02)
    return noise * init_std


def make_tensor(
    name: str,
    shape: tuple[int, ...],
    *,
    role: str,
    seed: int,
    dtype: torch.dtype,
    delta_scale: float,
    init_std: float = 0.02,
) -> torch.Tensor:
    """One tensor of ``role`` ("base" or any relative's name), float32 maths, cast once to dtype."""
    base = _base_tensor(name, shape, seed=seed, init_std=init_std)
    if role != "base":
        std = base.std() if base.numel() > 1 else torch.tensor(init_std)
        delta = torch.randn(shape, generator=_generator(seed, role, name), dtype=torch.float32)
        base = base + delta * (delta_scale * float(std))
    return base.to(dtype)


def _shards(shapes: dict[str, tuple[int, ...]], itemsize: int, shard_bytes: int | None) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = itemsize
        for d in shape:
            nbytes *= d
        if shard_bytes is not None and shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_model(
    out: Path,
    *,
    spec: LlamaSpec,
    role: str,
    seed: int,
    dtype: str,
    delta_scale: float,
    shard_bytes: int | None = None,
) -> Path:
    """Write one member of the family as an HF dir at ``out`` (created; must not exist)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=False)
    tdtype = DTYPES[dtype]
    shapes = tensor_shapes(spec)
    shards = _shards(shapes, torch.tensor([], dtype=tdtype).element_size(), shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for k, names in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {
            n: make_tensor(n, shapes[n], role=role, seed=seed, dtype=tdtype, delta_scale=delta_scale)
            for n in names
        }
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(hf_config(spec, dtype=dtype), indent=2) + "\n")
    return out


def write_family(
    root: Path,
    *,
    spec: LlamaSpec,
    roles: tuple[str, ...],
    seed: int,
    dtype: str,
    delta_scale: float,
    shard_bytes: int | None = None,
) -> dict[str, Path]:
    """Write ``root/<role>`` for each role ("base" plus relatives); returns role -> dir."""
    return {
        role: write_model(
            Path(root) / role, spec=spec, role=role, seed=seed, dtype=dtype,
            delta_scale=delta_scale, shard_bytes=shard_bytes,
        )
        for role in roles
    }


def safetensors_files(model_dir: Path) -> list[Path]:
    return sorted(Path(model_dir).glob("*.safetensors"))


def iter_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of an HF dir (any sharding), in file then key order."""
    for f in safetensors_files(model_dir):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                yield name, sf.get_tensor(name)


def fingerprint(model_dir: Path) -> str:
    """sha256 over sorted (name, dtype, shape, bytes): independent of sharding."""
    tensors = dict(iter_tensors(model_dir))
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def spec_dict(spec: LlamaSpec) -> dict:
    return asdict(spec)


def merge_stats(out: dict[str, torch.Tensor], config: dict, family: Path) -> dict:
    """Statistics of a random (DARE) merge of the models of `family` as `config` names them, over all
    tensors in float64: the parity fixtures record mergekit's, the parity test compares safemerge's.

    changed_fraction: share of elements with merged != base.
    l1_ratio: ||merged - base||_1 / ||Σ_i τ_i||_1 (≈ 1 when survivors are rescaled to keep the L1 norm
    in expectation, for one model; lower under TIES's sign election).
    """
    base = dict(iter_tensors(family / config["base_model"]))
    deltas = [{k: v.double() - base[k].double() for k, v in iter_tensors(family / m["model"])}
              for m in config["models"] if m["model"] != config["base_model"]]
    changed = total = 0
    l1_out = l1_ref = 0.0
    for name, t in out.items():
        d = t.double() - base[name].double()
        changed += int((d != 0).sum())
        total += d.numel()
        l1_out += float(d.abs().sum())
        l1_ref += float(sum(dd[name] for dd in deltas).abs().sum())
    return {"changed_fraction": changed / total, "l1_ratio": l1_out / l1_ref, "elements": total}
