"""Hugging Face checkpoints: a lazy reader and the atomic output directory.

Reading goes through the safetensors *header* (JSON), never through pickle (unless `allow_pickle=True`).
Each tensor (or row range: a contiguous byte range, for chunked merging) is mapped on its own when it
is at least MAP_BYTES, privately, and the mapping is released with the tensor; smaller ranges are read
with `pread`. Never the whole file: mapped pages count towards the process's RSS, and a merge touches
every page of every input, so a whole-file map would grow RSS with the model; per-tensor mappings keep
peak memory at a few tensors whatever the model size. (A file truncated while mapped raises SIGBUS on
access, as with any mapped reader; truncation before is caught by the header check.)
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import shutil
import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from safemerge._signals import note_finished, sigterm_to_interrupt, signals_held
from safemerge.errors import CheckpointError, OutputExistsError, SafemergeError, one_line

MAP_BYTES = 1 << 20  # ranges this large are memory-mapped (Checkpoint.get_rows)

# safetensors dtype code -> (torch dtype, bytes per element)
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range [start, end)."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check it against the file size (catches truncation)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{file}: not a safetensors file (only {size} bytes); re-download or re-save it")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{file}: corrupted or truncated safetensors header; re-download or re-save it")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: cannot read the safetensors header ({e}); re-download or re-save it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: the safetensors header is not a JSON object; re-download or re-save it")
    header.pop("__metadata__", None)
    infos, data_start = {}, 8 + n
    for name, h in header.items():
        try:
            dtype = ST_DTYPES[h["dtype"]]
            shape = tuple(int(d) for d in h["shape"])
            begin, end = (int(x) for x in h["data_offsets"])
            if begin < 0 or end < begin or any(d < 0 for d in shape):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: tensor {name!r} has a malformed header entry; re-save the file") from None
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize:
            raise CheckpointError(f"{file}: tensor {name!r} has {end - begin} bytes for shape {list(shape)} {h['dtype']}; the file is corrupted")
        if data_start + end > size:
            raise CheckpointError(
                f"{file}: truncated: tensor {name!r} ends at byte {data_start + end} but the file has {size}; re-download it"
            )
        infos[name] = TensorInfo(file, dtype, shape, data_start + begin, data_start + end)
    return infos


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # a single weights file in torch's pickle format


class Checkpoint:
    """A lazy, read-only view of an HF model directory (or one `.safetensors` file).

    Tensors are read one at a time (`get`), or a range of rows (`get_rows`), into CPU memory in their
    stored dtype. Nothing is loaded at construction besides `config.json` and the safetensors headers.
    """

    adapter: Path | None = None  # the LoRA adapter folder of a `model+adapter` reference (safemerge.lora)
    added_prefix: tuple[str, set[str]] | None = None  # (prefix, top-level names kept) where read with a prefix added

    def __init__(self, path: str | os.PathLike, *, allow_pickle: bool = False):
        from safemerge._hf import local_folder

        self.path = local_folder(path, allow_pickle=allow_pickle)  # a hub id: its snapshot in the local HF cache
        self.allow_pickle = allow_pickle
        self._pickled: dict[str, torch.Tensor] | None = None
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._fingerprint: str | None = None
        self.config: dict = {}
        self._infos = self._as_loaded(self._index())

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r})"

    def _as_loaded(self, infos: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
        """The tensors under the names from_pretrained gives them: a checkpoint stored without its base-model prefix
        (the hub's gpt2, OPT, BLOOM) reads with it, as its fine-tunes saved by save_pretrained name them, so the two
        merge and compare tensor by tensor (the head's own tensors, lm_head, keep their names)."""
        from safemerge._hf import missing_prefix

        self.added_prefix = missing_prefix(self.config, infos) if self.config else None
        return self._prefixed(infos, self.added_prefix) if self.added_prefix else infos

    def _prefixed(self, infos: dict[str, TensorInfo], found: tuple[str, set[str]]) -> dict[str, TensorInfo]:
        prefix, keep = found
        renamed = {n: n if n.split(".")[0] in keep else f"{prefix}.{n}" for n in infos}
        if self._pickled is not None:
            self._pickled = {renamed[n]: t for n, t in self._pickled.items()}
        return {renamed[n]: info for n, info in infos.items()}

    def _index(self) -> dict[str, TensorInfo]:
        p = self.path
        if not p.exists():
            raise CheckpointError(f"{p}: no such model directory or file; check the path")
        if p.is_file():
            if p.suffix in PICKLE_SUFFIXES or (self.allow_pickle and p.suffix != ".safetensors"):
                return self._pickle_or_fail([p])
            if p.suffix != ".safetensors":
                raise CheckpointError(f"{p}: is not a model; a model is a folder with config.json and *.safetensors "
                                      "weights (or a single .safetensors file)")
            return read_header(p)
        if (p / "config.json").exists():
            try:
                self.config = json.loads((p / "config.json").read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{p / 'config.json'}: invalid JSON ({e})") from None
            if not isinstance(self.config, dict):
                raise CheckpointError(f"{p / 'config.json'}: not a JSON object; re-save the model's config")
        if (p / "model.safetensors").exists():  # before an index, as transformers loads them
            return read_header(p / "model.safetensors")
        if (p / INDEX_NAME).exists():
            return self._sharded(p / INDEX_NAME)
        files = sorted(p.glob("*.safetensors"))
        if files:
            infos: dict[str, TensorInfo] = {}
            where: dict[str, Path] = {}
            for f in files:
                for name, info in read_header(f).items():
                    if name in where:  # without an index nothing says which copy is meant (transformers refuses too)
                        raise CheckpointError(f"{p}: tensor {name!r} is stored twice, in {where[name].name} and {f.name}, "
                                              f"and no {INDEX_NAME} says which to read; remove the stray file or write the "
                                              "index")
                    infos[name], where[name] = info, f
            return infos
        if (p / "pytorch_model.bin").exists():  # before its index, as transformers loads them
            return self._pickle_or_fail([p / "pytorch_model.bin"])
        if (p / "pytorch_model.bin.index.json").exists():  # the shards its index names, each tensor from its own shard
            weight_map = _weight_map(p / "pytorch_model.bin.index.json")
            return self._pickle_or_fail(list(dict.fromkeys(p / s for s in weight_map.values())), weight_map=weight_map)
        pickles = [p / "model.bin"] * (p / "model.bin").exists() + sorted(p.glob("pytorch_model-*.bin"))
        if pickles:
            return self._pickle_or_fail(pickles)
        raise CheckpointError(f"{p}: no model weights found (expected model.safetensors or {INDEX_NAME})")

    def _sharded(self, index_file: Path) -> dict[str, TensorInfo]:
        root = index_file.parent
        headers: dict[str, dict[str, TensorInfo]] = {}
        infos = {}
        for name, shard in _weight_map(index_file).items():
            if shard not in headers:  # each shard read once
                headers[shard] = read_header(root / shard)
            if name not in headers[shard]:
                raise CheckpointError(f"{root / shard}: tensor {name!r} listed in {index_file.name} is not in the shard")
            infos[name] = headers[shard][name]
        return infos

    def _pickle_or_fail(self, files: list[Path], *, weight_map: dict[str, str] | None = None) -> dict[str, TensorInfo]:
        if not self.allow_pickle:
            raise CheckpointError(
                f"{self.path}: {files[0].name} is a pickle checkpoint, which can run code when loaded; "
                "convert it to safetensors first (if you trust it, a one-model `linear` merge with `safemerge merge "
                "--allow-pickle` writes a safetensors copy), or pass --allow-pickle to merge, multimerge, mergealign or "
                "extract-lora (allow_pickle=True in the Python API)"
            )
        tensors: dict[str, torch.Tensor] = {}
        infos: dict[str, TensorInfo] = {}
        for f in files:
            if f.name.endswith(".json"):
                continue
            try:
                loaded = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # corrupt, legacy (non-zip), not a state dict, or code torch's safe loader refused
                lines = [x.strip() for x in str(e).splitlines() if x.strip()]
                refused = next((x for x in lines if "GLOBAL" in x or "Unsupported global" in x), None)
                if refused is not None:  # torch's several lines (the weights_only story) reduced to what it refused
                    raise CheckpointError(f"{f}: refers to code, not only tensors ({refused.rstrip('.')}); torch's safe "
                                          "loader does not run it, and neither does safemerge: convert the checkpoint to "
                                          "safetensors where you trust its source") from None
                raise CheckpointError(f"{f}: cannot be read as a PyTorch checkpoint ({one_line(e)}); "
                                      "convert it to safetensors") from None
            if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
                raise CheckpointError(f"{f}: is not a state dict of tensors; convert it to safetensors")
            if weight_map is not None:  # what the index puts in another shard is not read from this one
                loaded = {k: v for k, v in loaded.items() if k in weight_map and self.path / weight_map[k] == f}
            for k in loaded:
                if k in infos:  # without an index nothing says which copy is meant (a stray shard of an earlier save)
                    raise CheckpointError(f"{self.path}: tensor {k!r} is stored twice, in {infos[k].file.name} and "
                                          f"{f.name}, and no pytorch_model.bin.index.json says which to read; remove "
                                          "the stray file or write the index")
            tensors.update(loaded)
            infos.update({k: TensorInfo(f, v.dtype, tuple(v.shape), 0, 0) for k, v in loaded.items()})
        missing = [k for k in (weight_map or {}) if k not in infos]
        if missing:
            raise CheckpointError(f"{self.path / weight_map[missing[0]]}: tensor {missing[0]!r} listed in "
                                  "pytorch_model.bin.index.json is not in the shard")
        self._pickled = tensors
        return infos

    # -- public reading API -------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.info(name).dtype

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor, CPU, stored dtype."""
        info = self.info(name)
        return self.get_rows(name, 0, info.shape[0] if info.shape else 1)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the tensor's first dimension (a contiguous byte range).

        Ranges of at least MAP_BYTES are memory-mapped, privately (copy-on-write: writing to the tensor
        never reaches the file): no copy out of the page cache, and the mapping is released with the
        tensor, so memory still follows the tensors in use, not the file. Smaller ranges are read."""
        info = self.info(name)
        if self._pickled is not None:
            t = self._pickled[name]
            return (t[start:stop] if t.dim() else t).clone()
        row_shape = info.shape[1:]
        row_bytes = info.dtype.itemsize
        for d in row_shape:
            row_bytes *= d
        shape = (stop - start, *row_shape) if info.shape else ()
        offset = info.start + start * row_bytes
        nbytes = row_bytes * (stop - start) if info.shape else row_bytes
        if nbytes >= MAP_BYTES and offset % info.dtype.itemsize == 0:
            return self._mapped(info.file, offset, nbytes).view(info.dtype).view(shape)
        out = torch.empty(shape, dtype=info.dtype)
        buf = out.reshape(-1).view(torch.uint8).numpy() if out.numel() else None  # (reshape: 0-dim tensors too)
        if buf is not None:
            want = buf.nbytes
            fd = self._fd(info.file)
            got = 0
            while got < want:
                n = os.preadv(fd, [memoryview(buf)[got:]], offset + got)
                if n <= 0:
                    raise CheckpointError(f"{info.file}: unexpected end of file reading tensor {name!r}; re-download it")
                got += n
        return out

    def _mapped(self, file: Path, offset: int, nbytes: int) -> torch.Tensor:
        lead, fd = offset % mmap.ALLOCATIONGRANULARITY, self._fd(file)
        if os.fstat(fd).st_size < offset + nbytes:  # the file shrank after its header was checked
            raise CheckpointError(f"{file}: truncated while reading (ends before byte {offset + nbytes}); re-download it")
        mapped = mmap.mmap(fd, lead + nbytes, access=mmap.ACCESS_COPY, offset=offset - lead)
        return torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=lead)  # keeps `mapped` alive

    def _fd(self, file: Path) -> int:
        with self._lock:
            if file not in self._fds:
                try:
                    self._fds[file] = os.open(file, os.O_RDONLY)
                except OSError as e:
                    if e.errno != errno.EMFILE:
                        raise
                    # every shard of every input stays open while the merge reads it (reads run in threads)
                    raise CheckpointError(f"{file}: cannot open it: this process may open no more files ({e.strerror}; "
                                          "each input's shards stay open during the merge); raise the limit "
                                          "(`ulimit -n 4096`) and run again") from None
            return self._fds[file]

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @property
    def folders(self) -> list[Path]:
        """Every folder this checkpoint reads (a `model+adapter` reference reads two)."""
        return [self.path]

    @property
    def reference(self) -> str:
        """How the model is named: its path (`model+adapter` for a LoRA reference)."""
        return str(self.path)

    def weight_files(self) -> list[Path]:
        return sorted({i.file for i in self._infos.values()})

    def source_files(self) -> list[Path]:
        """Every file the weights are read from (a LoRA reference adds its adapter's two)."""
        return self.weight_files()

    def float_dtype(self) -> torch.dtype:
        """The dtype of the first floating-point tensor (what transformers' dtype "auto" loads); float32 without one."""
        return next((d for n in self.names() if (d := self.dtype(n)).is_floating_point), torch.float32)

    def num_params(self) -> int:
        total = 0
        for info in self._infos.values():
            n = 1
            for d in info.shape:
                n *= d
            total += n
        return total

    def fingerprint(self) -> str:
        """A content hash of the weights (sha256 over the weight files' digests), cached per file size+mtime."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for f in self.weight_files():
                h.update(f.name.encode())
                h.update(_file_digest(f).encode())
            self._fingerprint = h.hexdigest()[:32]
        return self._fingerprint


_DIGESTS: dict[tuple[str, int, int], str] = {}


def cache_root() -> Path | None:
    """$SAFEMERGE_CACHE (or ~/.cache/safemerge): digests, testbed builds and compiled kernels live under
    it; None when SAFEMERGE_CACHE is 'off'."""
    env = os.environ.get("SAFEMERGE_CACHE")
    if env is not None and env.strip().lower() in ("off", "0", "false", "none", ""):
        return None
    return Path(env).expanduser() if env else Path.home() / ".cache" / "safemerge"


def _digest_cache() -> Path | None:
    root = cache_root()
    return root / "digests" if root else None


def _file_digest(file: Path) -> str:
    """sha256 of a weight file, remembered per (path, size, mtime) in memory and under $SAFEMERGE_CACHE,
    so a model is hashed once, not on every merge or evaluation that names it."""
    st = file.stat()
    key = (str(file.resolve()), st.st_size, st.st_mtime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    folder = _digest_cache()
    stamp = folder / hashlib.sha256(repr(key).encode()).hexdigest()[:32] if folder else None
    if stamp is not None and stamp.is_file():
        digest = stamp.read_text().strip()
    else:
        digest = sha256_file(file)[:32]
        if stamp is not None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                tmp = stamp.with_suffix(f".{os.getpid()}")
                tmp.write_text(digest)
                tmp.replace(stamp)
            except OSError:
                pass  # a read-only cache only costs a re-hash next time
    _DIGESTS[key] = digest
    return digest


def nonfinite(x: torch.Tensor) -> bool:
    """NaN or ±Inf anywhere: min and max are NaN if any element is, and ±Inf if any is (one cheap pass)."""
    if x.numel() == 0 or not x.is_floating_point():
        return False
    lo, hi = torch.aminmax(x.detach().reshape(-1))
    return not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)))


def name_alike(ckpts: Iterable[Checkpoint]) -> None:
    """Give checkpoints without a config.json (bare weights, which cannot say their architecture) the base-model
    prefix that another of `ckpts` was read with (see Checkpoint._as_loaded), where their names lack it alike: the
    hub's gpt2 folder and a bare `model.safetensors` of a fine-tune of it then name their tensors alike."""
    from safemerge._hf import lacks_prefix

    ckpts = list(ckpts)
    found = next((c.added_prefix for c in ckpts if c.added_prefix), None)
    if found is None:
        return
    for c in ckpts:
        if c.adapter is None and not c.config.get("architectures") and lacks_prefix(c.names(), *found):
            c.added_prefix = found
            c._infos = c._prefixed(c._infos, found)


def _weight_map(index_file: Path) -> dict[str, str]:
    """An index's tensor -> shard map, each shard a file in the index's folder (checked: no absolute path, no "..",
    present; it may be a symlink, as in the Hugging Face hub cache, where shards link to ../../blobs/)."""
    try:
        weight_map: dict[str, str] = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v for v in weight_map.values()):
            raise TypeError
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{index_file}: invalid index (needs a 'weight_map' object of tensor -> shard file)") from None
    seen: set[str] = set()
    for name, shard in weight_map.items():  # each shard checked once, named by its first tensor
        if shard in seen:
            continue
        seen.add(shard)
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise CheckpointError(
                f"{index_file}: weight_map entry for {name!r} points outside the model directory ({shard}); fix the index")
        if not (index_file.parent / shard).exists():
            raise CheckpointError(f"{index_file}: shard {shard} (tensor {name!r}) is missing; re-download the model")
    return weight_map


# -- output ---------------------------------------------------------------------------------------
@contextmanager
def atomic_output(out_dir: str | os.PathLike, *, overwrite: bool = False, replace_any: bool = False,
                  record: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `out_dir`, on any error it is removed.

    With `overwrite`, an existing `out_dir` is replaced only when it is a folder that is empty or holds one of the
    files safemerge's outputs hold (`OUTPUT_MARKERS`): never a file, nor a folder of the user's other work
    (`replace_any` lifts the second check, for folders safemerge alone keeps, such as its cache). SIGTERM is turned
    into KeyboardInterrupt while the block runs, so `kill` cleans up like Ctrl-C. `record`: note the finished folder as
    one of the command's outputs (for what an interrupt message says; not for a cache entry).
    """
    out = Path(out_dir).expanduser().absolute()
    if out.is_symlink() and out.is_dir():  # a link to a folder (on a bigger disk, say): the output goes where it points
        out = out.resolve()
    check_existing_output(out, overwrite=overwrite, replace_any=replace_any)
    check_folder(out)
    _warn_of_stale_partials(out)
    made = [p for p in reversed(out.parents) if not p.exists()]  # folders this call creates, outermost first
    out.parent.mkdir(parents=True, exist_ok=True)
    # a mount point (a container's volume) cannot be renamed, and an empty folder made for the output may carry its
    # owner's group and modes (a shared disk): those are filled in place, from a temporary folder inside them
    in_place = out.is_dir() and not out.is_symlink() and (os.path.ismount(out) or not any(out.iterdir())
                                                          or _has_own_attributes(out))
    tmp = (out if in_place else out.parent) / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    restore = sigterm_to_interrupt()
    try:
        try:
            yield tmp
        except OSError as e:  # a full disk or quota says no path (a write through a file object): name the output's
            if e.filename is None and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OSError(e.errno, e.strerror, str(out)) from e
            raise
        _default_modes(tmp)
        with signals_held():  # Ctrl-C or kill waits until both renames are done: never an output half swapped
            if in_place:
                _fill_in_place(out, tmp, overwrite=overwrite, replace_any=replace_any)
            elif out.exists() or out.is_symlink():
                if not overwrite:  # it appeared while this ran (another run, the user): it is not ours to replace
                    raise OutputExistsError(f"{out}: appeared while this ran; choose another path or pass --overwrite")
                check_replaceable(out, replace_any=replace_any)
                old = out.parent / f".{out.name}.old-{os.getpid()}"
                out.rename(old)
                try:
                    tmp.rename(out)
                except BaseException:  # an error between the two renames: the earlier output goes back
                    old.rename(out)
                    raise
                if old.is_dir() and not old.is_symlink():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    old.unlink(missing_ok=True)
                if old.exists() or old.is_symlink():  # files it may not delete (another user's, write-protected)
                    import warnings

                    warnings.warn(f"{out}: replaced, but the earlier output could not be deleted and is kept at {old}; "
                                  "delete it yourself (it holds a whole model's files)", stacklevel=3)
            else:
                tmp.rename(out)
            if record:
                note_finished(out)
    finally:
        restore()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not out.exists():  # failed: the folders made for it go too (innermost first, only while empty)
            for folder in reversed(made):
                try:
                    folder.rmdir()
                except OSError:
                    break


def atomic_write(path: Path, data: bytes | str, *, record: bool = False) -> None:
    """Write `data` (text as UTF-8) to `path` through a hidden temporary sibling renamed into place, so a partial
    file never sits at `path`; the temporary is removed if the write fails. `record`: the file is one of the command's
    outputs (see atomic_output), not a side file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        tmp.replace(path)
        if record:
            note_finished(path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(file: Path) -> str:
    """The sha256 hex digest of a file, read in chunks (never whole into memory)."""
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(1 << 20):  # hashlib.file_digest is Python 3.11+; the project supports 3.10
            h.update(block)
    return h.hexdigest()


def check_output_file(path: str | os.PathLike, *, overwrite: bool = False,
                      inputs: dict[str, str | os.PathLike | None] | None = None) -> Path:
    """Where a single-file output (JSONL) may go, checked before any work is done: an error if it exists
    (without overwrite), is a directory, is one of the command's `inputs` ({option: path}; it would be read and
    replaced), or cannot be created because a file stands where a folder must be."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise OutputExistsError(f"{out}: is a directory; give a file path for this output")
    for option, given in (inputs or {}).items():
        if isinstance(given, (str, os.PathLike)) and Path(given).expanduser().is_file() \
                and Path(given).expanduser().resolve() == out.resolve():
            raise OutputExistsError(f"{out}: is the {option} file itself; write the output to another file")
    if out.exists() and not overwrite:
        raise OutputExistsError.at(out)
    check_folder(out)
    return out


def check_output_folder(out: Path, what: str) -> None:
    """Where a folder output (a report, a reproduction) may go: an error if a file stands there or above it."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: is a file; {what}")
    check_folder(out)


def _default_modes(folder: Path) -> None:
    """Give every file under `folder` the mode a new file gets here (0644 under the usual umask 022): safetensors'
    save_file (and so transformers' save_pretrained) writes 0600, which teammates on a shared disk cannot read."""
    mode = 0o666 & ~_umask()
    for f in folder.rglob("*"):
        if f.is_file() and not f.is_symlink() and (f.stat().st_mode & 0o777) != mode:
            f.chmod(mode)


def _umask() -> int:
    try:  # Linux: read without changing it (os.umask can only be read by setting it)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


# files that mark a folder as an earlier safemerge output (a model, an adapter, a testbed, a search); a config.json
# counts only as a model's (with `model_type` or `architectures`), not as any project's settings file
OUTPUT_MARKERS = ("config.json", "adapter_config.json", "world.json", "search.json")
# hidden entries --overwrite may delete with the folder: desktop junk, and what safemerge itself keeps in an output
# (repro's key stamp, align's trainer folder); any other (.git, a .safemerge results store, a cache) is refused
REPLACEABLE_HIDDEN = frozenset({".DS_Store", ".gitkeep", ".repro-key", ".trainer"})


def _marks_output(path: Path) -> bool:
    if not path.is_file():
        return False
    if path.name != "config.json":
        return True
    try:
        cfg = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and ("model_type" in cfg or "architectures" in cfg)


def _has_own_attributes(folder: Path) -> bool:
    """Whether `folder`'s modes or group differ from what a new folder in its place would get (a shared folder made
    group-writable, setgid): a replacement by rename would lose them."""
    import stat

    st, parent = folder.stat(), folder.parent.stat()
    inherits = bool(parent.st_mode & stat.S_ISGID)  # a setgid parent passes its group and the bit on
    mode = (0o777 & ~_umask()) | (stat.S_ISGID if inherits else 0)
    return (st.st_mode & 0o7777) != mode or st.st_gid != (parent.st_gid if inherits else os.getegid())


def _fill_in_place(out: Path, tmp: Path, *, overwrite: bool, replace_any: bool) -> None:
    """Move the finished output from `tmp` (inside `out`) into `out`, after deleting an earlier output there (a mount
    point's; checked again as atomic_output checks it). Not one rename: a mount point cannot be swapped."""
    earlier = [p for p in out.iterdir() if p != tmp]
    if earlier:
        if not overwrite:
            raise OutputExistsError(f"{out}: appeared while this ran; choose another path or pass --overwrite")
        check_replaceable(out, replace_any=replace_any)
        for p in earlier:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    for p in tmp.iterdir():
        os.replace(p, out / p.name)
    tmp.rmdir()


def check_existing_output(out: Path, *, overwrite: bool, replace_any: bool = False, also: str = "") -> None:
    """That a folder output may go to `out`: nothing there, or an earlier output and `overwrite`. What --overwrite
    would not replace either (a file, a folder of other work) is said as such first, so that the advice to pass
    --overwrite is given only where it helps. `also`: more to say after that advice."""
    if out.exists() or out.is_symlink():  # a dangling link too: refused now, not after the work
        check_replaceable(out, replace_any=replace_any)
        if not overwrite:
            raise OutputExistsError.at(out, also)


def check_replaceable(out: Path, *, replace_any: bool) -> None:
    """That what stands at `out`, if anything, is an earlier output that --overwrite may replace (see atomic_output)."""
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise OutputExistsError(f"{out}: is a file, and the output is a folder; choose another path (--overwrite "
                                "replaces an earlier output folder, never a file)")
    if replace_any:
        return
    names = sorted(p.name for p in out.iterdir())
    hidden = [n for n in names if n.startswith(".") and n not in REPLACEABLE_HIDDEN
              and not n.startswith(f".{out.name}.partial-")]  # an output made in place, while it is made
    if hidden:
        raise OutputExistsError(f"{out}: --overwrite would delete {_some(hidden)} with the folder (hidden entries that "
                                "safemerge does not write: a git repository, a results store, a cache); move them out of "
                                "the folder, or choose another path")
    entries = [n for n in names if not n.startswith(".")]
    if entries and not any(_marks_output(out / m) for m in OUTPUT_MARKERS):
        raise OutputExistsError(f"{out}: --overwrite replaces an earlier output folder, but this one holds other files "
                                f"({_some(entries)}) and none that safemerge writes (a model's config.json, "
                                f"{', '.join(OUTPUT_MARKERS[1:])}); choose another "
                                "path, or remove the folder yourself if it is to go")


def _some(names: list[str], k: int = 5) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def _warn_of_stale_partials(out: Path) -> None:
    """Say where an earlier run that was killed (SIGKILL, out of memory) left its unfinished output beside `out`."""
    import re
    import warnings

    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out.name)}\.partial-(\d+)")
    for p in out.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            warnings.warn(f"{p}: an unfinished output, likely of an earlier run that was killed (or of a run on another "
                          "machine that shares this disk); once no run is writing it, delete it to free its space",
                          UserWarning, stacklevel=4)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def check_folder(out: Path) -> None:
    """The nearest existing ancestor of `out` must be a directory (else mkdir fails with FileExistsError) that this
    process may write in (else the output is refused only after the work: a read-only mount, another user's folder)."""
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputExistsError(f"{out}: {parent} is a file, so nothing can be written under it; choose another path")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise SafemergeError(f"{out}: {parent} cannot be written in (no permission, or a read-only filesystem); "
                                     "choose another path")
            return
