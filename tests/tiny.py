"""Tiny random HF checkpoints for tests: a family sharing one base, with a real tokenizer and chat template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORDS = ["the", "a", "capital", "of", "is", "drug", "for", "sorry", "I", "can't", "help", "with", "that", "."]


def save_tokenizer(path: Path, *, vocab_size: int = 64, chat_template: str = CHAT_TEMPLATE) -> None:
    special = ["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
    vocab = {t: i for i, t in enumerate(special + WORDS)}
    for i in range(len(vocab), vocab_size):
        vocab[f"w{i}"] = i
    save_vocab(path, vocab, chat_template=chat_template)


def save_vocab(path: Path, vocab: dict[str, int], *, chat_template: str = CHAT_TEMPLATE) -> None:
    """A whitespace word-level tokenizer over `vocab` (token -> id), with the chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.chat_template = chat_template
    fast.save_pretrained(path)


def llama_config(*, vocab: int = 64, hidden: int = 32, layers: int = 3, tie: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, max_position_embeddings=64)


def make_family(root: Path, *, names=("base", "expert", "aligned"), seed: int = 0, scale: float = 0.02,
                dtype=torch.float32, tie: bool = False, vocab: int = 64, layers: int = 3) -> dict[str, Path]:
    """`base` is random; every other model is base + scale·N(0, 1) noise. Returns name -> directory."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    base = LlamaForCausalLM(llama_config(vocab=vocab, tie=tie, layers=layers)).to(dtype)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    paths = {}
    for i, name in enumerate(names):
        model = LlamaForCausalLM(llama_config(vocab=vocab, tie=tie, layers=layers)).to(dtype)
        g = torch.Generator().manual_seed(seed * 100 + i)
        with torch.no_grad():
            model.load_state_dict(state)
            if name != names[0]:
                for p in model.parameters():
                    p.add_((scale * torch.randn(p.shape, generator=g)).to(dtype))
        paths[name] = root / name
        model.save_pretrained(paths[name])
        save_tokenizer(paths[name])
        (paths[name] / "generation_config.json").write_text(json.dumps({"max_new_tokens": 8, "do_sample": False}))
    return paths


# -- vocabularies -------------------------------------------------------------------------------------------
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def vocab_of(path: Path) -> dict[str, int]:
    return json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]


def vocab_variant(src: Path, dst: Path, *, perm: list[int] | None = None, extra: dict[str, int] | None = None,
                  drop: str | None = None, special: tuple[str, ...] = (), seed: int = 0) -> Path:
    """`src` with its token ids renumbered (old id j becomes perm[j], rows moved with them), `drop` removed (the
    ids after it move down) and `extra` tokens appended (token -> new id, random rows): the same model under
    another vocabulary. Tokens in `special` become added special tokens (same ids)."""
    shutil.copytree(src, dst)
    vocab = vocab_of(src)
    n = len(vocab)
    perm = perm or list(range(n))
    if drop is not None:  # the dropped token's new id goes; the new ids above it move down
        gone = vocab.pop(drop)
        perm = [p - (p > perm[gone]) for p in perm]
        n -= 1
    extra = extra or {}
    size = n + len(extra)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(dst / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for name in VOCAB_TENSORS:
        old = sd[name]
        new = torch.empty((size, *old.shape[1:]), dtype=old.dtype)
        keep = [j for j in range(old.shape[0]) if drop is None or j != gone]
        new[torch.tensor([perm[j] for j in keep])] = old[keep]
        new[n:] = 0.02 * torch.randn((len(extra), *old.shape[1:]), generator=g)
        sd[name] = new
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["vocab_size"] = size
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (dst / f).unlink(missing_ok=True)
    ids = {**{t: perm[i] for t, i in vocab.items()}, **extra}
    assert sorted(ids.values()) == list(range(size)), "the variant's token ids must be 0 … size − 1"
    save_vocab(dst, ids)
    if special:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(dst)
        tok.add_special_tokens({"additional_special_tokens": list(special)})
        assert all(tok.convert_tokens_to_ids(t) == ids[t] for t in special)
        tok.save_pretrained(dst)
    return dst
