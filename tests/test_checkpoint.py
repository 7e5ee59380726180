"""Reading checkpoints lazily, and refusing corrupt, unsafe or inconsistent ones with a clear error."""

from __future__ import annotations

import json
import re
import shutil

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from safemerge.checkpoint import MAP_BYTES, Checkpoint, atomic_output, check_output_file
from safemerge.errors import CheckpointError, OutputExistsError

MODEL_CONFIG = '{"model_type": "llama"}'  # what marks a folder as an earlier output (a model's config.json)


def test_reads_single_and_row_ranges(tiny_family):
    c = Checkpoint(tiny_family["base"])
    name = "model.embed_tokens.weight"
    full = c.get(name)
    assert full.shape == c.shape(name) == (64, 32) and c.dtype(name) == torch.float32
    torch.testing.assert_close(c.get_rows(name, 10, 20), full[10:20])
    assert c.config["model_type"] == "llama"
    assert c.num_params() > 0


def test_reads_sharded_with_index(tmp_path):
    a, b = torch.randn(3, 4), torch.randn(5)
    save_file({"a": a}, tmp_path / "s1.safetensors")
    save_file({"b": b}, tmp_path / "s2.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    c = Checkpoint(tmp_path)
    assert sorted(c.names()) == ["a", "b"]
    torch.testing.assert_close(c.get("b"), b)


def test_large_ranges_are_mapped_copy_on_write(tmp_path):
    """Ranges of at least MAP_BYTES come memory-mapped: same values as a read, writes stay private, and
    a file that shrinks after its header was checked gives an error, not a crash."""
    big = torch.randn(1100, 512).to(torch.bfloat16)  # 1.1 MiB
    save_file({"small": torch.randn(3), "big": big}, tmp_path / "model.safetensors")
    c = Checkpoint(tmp_path)
    x = c.get("big")
    assert x.numel() * 2 >= MAP_BYTES and torch.equal(x, big)
    assert torch.equal(c.get_rows("big", 100, 1100), big[100:])
    x.mul_(2)  # private: neither the file nor a new read sees it
    assert torch.equal(c.get("big"), big) and torch.equal(Checkpoint(tmp_path).get("big"), big)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 4096])
    with pytest.raises(CheckpointError, match="truncated while reading"):
        c.get("big")


def test_fingerprint_tracks_content(tmp_path, tiny_family):
    assert Checkpoint(tiny_family["base"]).fingerprint() == Checkpoint(tiny_family["base"]).fingerprint()
    assert Checkpoint(tiny_family["base"]).fingerprint() != Checkpoint(tiny_family["expert"]).fingerprint()


def test_truncated_file_is_named(tmp_path, tiny_family):
    d = tmp_path / "m"
    shutil.copytree(tiny_family["base"], d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors.*truncated"):
        Checkpoint(d)
    f.write_bytes(b"\x00\x01")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        Checkpoint(d)
    f.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        Checkpoint(d)


def test_index_pointing_outside_the_model_is_refused(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "outside.safetensors")
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../outside.safetensors"}}))
    with pytest.raises(CheckpointError, match="points outside the model directory"):
        Checkpoint(d)


def test_pickle_needs_allow_pickle(tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        Checkpoint(tmp_path)
    c = Checkpoint(tmp_path, allow_pickle=True)
    torch.testing.assert_close(c.get("w"), torch.ones(3))


class _RunsCode:
    def __reduce__(self):  # unpickling would call os.getcwd: code, not a tensor
        import os

        return (os.getcwd, ())


def test_a_pickle_that_refers_to_code_is_refused_even_when_pickle_is_allowed(tmp_path):
    torch.save({"w": torch.ones(3), "x": _RunsCode()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: refers to code, not only tensors \(Trying to load "
                                              r"unsupported GLOBAL .*getcwd.*\); torch's safe loader does not run it") as e:
        Checkpoint(tmp_path, allow_pickle=True)
    assert "\n" not in str(e.value)  # QA: torch's nine lines about weights_only


def test_missing_model_and_missing_weights(tmp_path):
    with pytest.raises(CheckpointError, match="no such model"):
        Checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=re.escape("no such local folder, and as a hub id: it is not in the local "
                                                        "Hugging Face cache and the hub cannot be reached; check the path, "
                                                        "or download it (`hf download no-such-org-x/Llama-2-7b-hf")):
        Checkpoint("no-such-org-x/Llama-2-7b-hf")  # review: said "check the path" of what a user meant as a hub id
    with pytest.raises(CheckpointError, match="no model weights"):
        Checkpoint(tmp_path)


def test_atomic_output_leaves_nothing_on_error_and_refuses_overwrite(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output(out) as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("boom")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_output(out) as tmp:
        (tmp / "config.json").write_text(MODEL_CONFIG)
    assert (out / "config.json").exists()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        with atomic_output(out):
            pass
    with atomic_output(out, overwrite=True) as tmp:
        (tmp / "new").write_text("y")
    assert sorted(p.name for p in out.iterdir()) == ["new"]


def test_overwrite_replaces_only_an_earlier_output_folder(tmp_path):
    """QA: `merge cfg . --overwrite` had replaced the user's project folder (the config with it), and a file named as
    the output had become a folder."""
    work = tmp_path / "project"
    work.mkdir()
    (work / "merge.yml").write_text("x")
    (work / "notes.txt").write_text("y")
    with pytest.raises(OutputExistsError, match=r"holds other files \(merge.yml, notes.txt\) and none that safemerge writes"):
        with atomic_output(work, overwrite=True):
            pass
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"z")
    with pytest.raises(OutputExistsError, match="is a file, and the output is a folder"):
        with atomic_output(weights, overwrite=True):
            pass
    assert sorted(p.name for p in work.iterdir()) == ["merge.yml", "notes.txt"] and weights.read_bytes() == b"z"
    with atomic_output(work, overwrite=True, replace_any=True) as tmp:  # a folder safemerge alone keeps (its cache)
        (tmp / "world.json").write_text("{}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_output(empty, overwrite=True) as tmp:
        (tmp / "config.json").write_text(MODEL_CONFIG)
    assert (empty / "config.json").exists()


def test_without_overwrite_what_overwrite_would_not_replace_is_said_as_such(tmp_path):
    """A file at OUT (or a folder of other work) got "already exists; pass --overwrite", and then, with --overwrite,
    "is a file": the first advice could not help."""
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"z")
    work = tmp_path / "project"
    work.mkdir()
    (work / "notes.txt").write_text("y")
    for at, message in ((weights, "is a file, and the output is a folder"), (work, r"holds other files \(notes.txt\)")):
        with pytest.raises(OutputExistsError, match=message) as e:
            with atomic_output(at):
                pass
        assert "pass --overwrite" not in str(e.value)
    assert weights.read_bytes() == b"z" and (work / "notes.txt").read_text() == "y"


def test_overwrite_of_a_link_to_a_folder_writes_where_it_points(tmp_path):
    """Review: the link was replaced by a new folder beside it (on the small disk), the earlier output kept behind it."""
    (tmp_path / "big").mkdir()
    target = tmp_path / "big" / "model"
    target.mkdir()
    (target / "config.json").write_text(MODEL_CONFIG)
    link = tmp_path / "out"
    link.symlink_to(target, target_is_directory=True)
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        with atomic_output(link):
            pass
    with atomic_output(link, overwrite=True) as tmp:
        (tmp / "new").write_text("y")
    assert link.is_symlink() and sorted(p.name for p in target.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "out"]
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    for overwrite in (False, True):  # refused before the work (it was after it: "appeared while this ran")
        with pytest.raises(OutputExistsError, match="is a file, and the output is a folder"):
            with atomic_output(dangling, overwrite=overwrite):
                pytest.fail("the work ran before the output was checked")


def test_overwrite_keeps_hidden_work_and_a_project_settings_file_marks_no_output(tmp_path):
    """Review: every hidden entry was taken for junk, so a folder holding only .git (a clone of an empty hub repo)
    was replaced, history and all, and an earlier output lost its .git and .safemerge results store; and any
    config.json (a project's {"lr": ...}) marked a folder as an earlier output, whose train.py and data/ went."""
    clone = tmp_path / "clone"
    (clone / ".git").mkdir(parents=True)
    (clone / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    model = tmp_path / "model"
    (model / ".safemerge").mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "llama"}')
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "config.json").write_text('{"lr": 1e-4}')
    (project / "train.py").write_text("print(1)")
    for out, words in ((clone, r"would delete \.git, \.gitattributes with the folder"),
                       (model, r"would delete \.safemerge with the folder"),
                       (project, r"holds other files \(config.json, data, train.py\) and none that safemerge writes")):
        before = sorted(p.name for p in out.iterdir())
        with pytest.raises(OutputExistsError, match=words):
            with atomic_output(out, overwrite=True):
                pass
        assert sorted(p.name for p in out.iterdir()) == before
    (model / ".safemerge").rmdir()
    (model / ".DS_Store").write_text("")  # desktop junk and safemerge's own stamps go with the folder
    (model / ".repro-key").write_text("k")
    with atomic_output(model, overwrite=True) as tmp:
        (tmp / "config.json").write_text('{"model_type": "llama"}')
    assert sorted(p.name for p in model.iterdir()) == ["config.json"]


@pytest.mark.parametrize("how, kept", [("error", "old"), ("signal", "new")])
def test_an_interrupt_in_the_swap_leaves_one_whole_output(tmp_path, monkeypatch, how, kept):
    """An error in the second rename puts the earlier output back. A signal landing inside either rename (after its
    system call; review: it had left the earlier output at .old-PID and nothing at the target) is held back until
    both renames are done."""
    import os
    import signal

    out = tmp_path / "out"
    with atomic_output(out) as tmp:
        (tmp / "config.json").write_text('{"model_type": "old"}')
    real_rename = Path.rename

    def rename(self, target):
        if how == "error" and self.name.startswith(".out.partial-"):
            raise KeyboardInterrupt
        done = real_rename(self, target)
        if how == "signal":
            os.kill(os.getpid(), signal.SIGTERM)  # atomic_output turns SIGTERM into KeyboardInterrupt
        return done

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(out, overwrite=True) as tmp:
            (tmp / "config.json").write_text('{"model_type": "new"}')
    monkeypatch.undo()
    assert json.loads((out / "config.json").read_text())["model_type"] == kept and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_unfinished_output_of_a_killed_run_is_pointed_out(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".out.partial-{dead}"  # what SIGKILL leaves: the process is gone
    stale.mkdir()
    with pytest.warns(UserWarning, match=rf"\.out\.partial-{dead}: an unfinished output, likely of an earlier run that "
                                         "was killed"):
        with atomic_output(tmp_path / "out") as tmp:
            (tmp / "config.json").write_text(MODEL_CONFIG)
    assert stale.exists()  # pointed out, not deleted (it may be another machine's run on a shared disk)


def test_a_failed_output_removes_the_folders_made_for_it(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "kept" / "new" / "deeper" / "out"):
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not list((tmp_path / "kept").iterdir())
    with atomic_output(tmp_path / "kept" / "new" / "out") as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / "kept" / "new" / "out" / "x").exists()


def test_zero_dim_tensor_reads(tmp_path):
    save_file({"s": torch.tensor(3.5, dtype=torch.bfloat16), "v": torch.ones(3)}, tmp_path / "model.safetensors")
    x = Checkpoint(tmp_path).get("s")
    assert x.shape == () and float(x) == 3.5


def test_a_file_output_is_checked_before_any_work(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputExistsError, match="is a directory"):
        check_output_file(tmp_path / "d", overwrite=True)
    with pytest.raises(OutputExistsError, match="already exists"):
        check_output_file(tmp_path / "f")
    with pytest.raises(OutputExistsError, match="is a file, so nothing can be written under it"):
        check_output_file(tmp_path / "f" / "sub" / "out.jsonl")
    assert check_output_file(tmp_path / "f", overwrite=True) == tmp_path / "f"
    assert check_output_file(tmp_path / "new" / "out.jsonl") == tmp_path / "new" / "out.jsonl"


def test_hub_cache_shards_that_are_symlinks_are_read(tmp_path):
    """The Hugging Face hub cache keeps a snapshot's files as links to ../../blobs/<hash>."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    a = torch.randn(3, 4)
    save_file({"a": a}, blobs / "1f2e")
    (blobs / "9c0d").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors"}}))
    (snap / "model-00001-of-00001.safetensors").symlink_to("../../blobs/1f2e")
    (snap / "model.safetensors.index.json").symlink_to("../../blobs/9c0d")
    torch.testing.assert_close(Checkpoint(snap).get("a"), a)
    (snap / "model.safetensors.index.json").unlink()
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "/abs/x.safetensors"}}))
    with pytest.raises(CheckpointError, match="points outside the model directory"):
        Checkpoint(snap)


def test_a_single_file_wins_over_a_stale_index_as_in_transformers(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "model.safetensors")
    save_file({"a": torch.zeros(2)}, tmp_path / "old-1.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "old-1.safetensors"}}))
    torch.testing.assert_close(Checkpoint(tmp_path).get("a"), torch.ones(2))


def test_shards_without_an_index_that_store_a_tensor_twice_are_refused(tmp_path):
    """Without an index nothing says which copy is meant: an error naming both files, not the later one silently."""
    save_file({"a": torch.ones(2), "b": torch.ones(2)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": torch.full((2,), 100.0)}, tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor 'b' is stored twice, in model-00001-of-00002.safetensors and "
                                              r"model-00002-of-00002.safetensors, and no model.safetensors.index.json"):
        Checkpoint(tmp_path)


@pytest.mark.parametrize("index", [{"weight_map": {"a": None}}, {"weight_map": {"a": 3}}, {"weight_map": ["a"]}])
def test_a_malformed_index_is_a_checkpoint_error(tmp_path, index):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="invalid index"):
        Checkpoint(tmp_path)


def _raw_safetensors(path, header: object, data: bytes = b"\0" * 8):
    import struct

    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("header, words", [
    (["a"], "not a JSON object"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, "malformed header entry"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [4, 0]}}, "malformed header entry"),
])
def test_malformed_safetensors_headers_are_named(tmp_path, header, words):
    _raw_safetensors(tmp_path / "model.safetensors", header)
    with pytest.raises(CheckpointError, match=words):
        Checkpoint(tmp_path)


def test_unreadable_config_and_pickle_are_checkpoint_errors(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(CheckpointError, match="config.json: invalid JSON"):
        Checkpoint(tmp_path)
    p = tmp_path / "pk"
    p.mkdir()
    (p / "pytorch_model.bin").write_bytes(b"not a zip archive")
    with pytest.raises(CheckpointError, match="cannot be read as a PyTorch checkpoint"):
        Checkpoint(p, allow_pickle=True)


def test_sharded_pickle_fingerprint_covers_every_shard(tmp_path):
    fps = []
    for value in (1.0, 2.0):
        d = tmp_path / str(value)
        d.mkdir()
        torch.save({"a": torch.full((2,), value)}, d / "pytorch_model-00001-of-00002.bin")
        torch.save({"b": torch.ones(2)}, d / "pytorch_model-00002-of-00002.bin")
        (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
            "a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}))
        fps.append(Checkpoint(d, allow_pickle=True).fingerprint())
    assert fps[0] != fps[1]


def test_a_sharded_pickle_is_read_through_its_index(tmp_path):
    """Review: every pytorch_model-*.bin was read, the last in name order winning, so a stale shard of an earlier save
    beside the index (all zeros here) became the weights, silently; transformers reads the index."""
    d = tmp_path / "m"
    d.mkdir()
    torch.save({"a": torch.ones(2)}, d / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": torch.full((2,), 2.0)}, d / "pytorch_model-00002-of-00002.bin")
    torch.save({"a": torch.zeros(2), "b": torch.zeros(2)}, d / "pytorch_model-00003-of-00003.bin")  # stale
    index = {"weight_map": {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    c = Checkpoint(d, allow_pickle=True)
    assert sorted(c.names()) == ["a", "b"] and float(c.get("a")[0]) == 1.0 and float(c.get("b")[0]) == 2.0
    assert [f.name for f in c.weight_files()] == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    index["weight_map"]["c"] = "pytorch_model-00002-of-00002.bin"
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="tensor 'c' listed in pytorch_model.bin.index.json is not in the shard"):
        Checkpoint(d, allow_pickle=True)
    index["weight_map"] = {"a": "./pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))  # an entry spelt with ./ is the same shard
    assert sorted(Checkpoint(d, allow_pickle=True).names()) == ["a", "b"]
    (d / "pytorch_model.bin.index.json").unlink()  # no index: nothing says which copy of 'a' is meant
    with pytest.raises(CheckpointError, match="tensor 'a' is stored twice, in pytorch_model-00001-of-00002.bin and "
                                              "pytorch_model-00003-of-00003.bin"):
        Checkpoint(d, allow_pickle=True)


def test_a_file_that_is_not_weights_is_not_called_a_pickle(tmp_path):
    from safemerge.checkpoint import Checkpoint
    from safemerge.errors import CheckpointError

    f = tmp_path / "prompts.jsonl"
    f.write_text('{"prompt": "x"}\n')
    with pytest.raises(CheckpointError, match="prompts.jsonl: is not a model; a model is a folder with config.json"):
        Checkpoint(f)
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a pickle checkpoint"):
        Checkpoint(tmp_path / "w.bin")


def test_outputs_get_the_default_file_mode(tmp_path):
    """QA: the testbed's (and save_pretrained's) model.safetensors came out 0600: safetensors writes it so."""
    import os

    from safetensors.torch import save_file

    with atomic_output(tmp_path / "out") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(MODEL_CONFIG)
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert modes == {"model.safetensors": 0o666 & ~umask, "config.json": 0o666 & ~umask}


def test_a_folder_that_appears_while_the_output_is_made_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="appeared while this ran"):
        with atomic_output(out) as tmp:
            (tmp / "config.json").write_text(MODEL_CONFIG)
            out.mkdir()  # another run, or the user, puts something there meanwhile
            (out / "notes.txt").write_text("mine")
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "config.json").write_text(MODEL_CONFIG)
    with pytest.raises(OutputExistsError, match="holds other files"):  # with --overwrite: checked again at the swap
        with atomic_output(earlier, overwrite=True) as tmp:
            (tmp / "config.json").write_text(MODEL_CONFIG)
            (earlier / "config.json").unlink()  # meanwhile the folder became someone's work
            (earlier / "notes.txt").write_text("mine")
    assert sorted(p.name for p in earlier.iterdir()) == ["notes.txt"]


def test_an_earlier_output_that_cannot_be_deleted_is_pointed_out(tmp_path, monkeypatch):
    """Review: a write-protected earlier output (a teammate's on a shared disk) was kept whole at .out.old-PID,
    without a word."""
    import safemerge.checkpoint as checkpoint

    out = tmp_path / "out"
    with atomic_output(out) as tmp:
        (tmp / "config.json").write_text(MODEL_CONFIG)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda path, ignore_errors=False: None)  # as a refused delete
    with pytest.warns(UserWarning, match=r"the earlier output could not be deleted and is kept at .*\.out\.old-\d+; "
                                         "delete it yourself"):
        with atomic_output(out, overwrite=True) as tmp:
            (tmp / "config.json").write_text(MODEL_CONFIG)


def test_a_full_disk_names_the_output(tmp_path):
    """A failed write through a file object has no filename: the error said which disk to free nowhere."""
    import errno

    with pytest.raises(OSError) as e:
        with atomic_output(tmp_path / "out"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_running_out_of_file_descriptors_says_what_to_raise(tiny_family, monkeypatch):
    """Review: 3 models of 23 shards each under `ulimit -n 70` ended in a traceback partway through the merge."""
    import errno
    import os

    import safemerge.checkpoint as checkpoint

    ck = Checkpoint(tiny_family["base"])
    name = next(iter(ck.names()))

    def no_more(path, flags):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(checkpoint.os, "open", no_more)
    with pytest.raises(CheckpointError, match=r"model.safetensors: cannot open it: this process may open no more "
                                              r"files .*ulimit -n 4096"):
        ck.get(name)


def test_an_empty_folder_or_a_mount_point_is_filled_in_place(tmp_path, monkeypatch):
    """Review: the output was always a new folder renamed over the old one, so a pre-made shared folder lost its
    group and modes, and a mount point (a container's volume) failed with EBUSY after the whole merge."""
    import os

    import safemerge.checkpoint as checkpoint

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2775)
    inode = shared.stat().st_ino
    with atomic_output(shared, overwrite=True) as tmp:
        assert tmp.parent == shared
        (tmp / "config.json").write_text(MODEL_CONFIG)
    assert shared.stat().st_ino == inode and shared.stat().st_mode & 0o7777 == 0o2775
    assert sorted(p.name for p in shared.iterdir()) == ["config.json"]
    with atomic_output(shared, overwrite=True) as tmp:  # and again, over that output: its folder keeps them still
        (tmp / "config.json").write_text(MODEL_CONFIG)
        (tmp / "model.safetensors").write_text("x")
    assert shared.stat().st_ino == inode and shared.stat().st_mode & 0o7777 == 0o2775
    assert sorted(p.name for p in shared.iterdir()) == ["config.json", "model.safetensors"]
    plain = tmp_path / "plain"  # an earlier output in a folder like any new one is swapped whole, as before
    with atomic_output(plain) as tmp:
        (tmp / "config.json").write_text(MODEL_CONFIG)
    inode = plain.stat().st_ino
    with atomic_output(plain, overwrite=True) as tmp:
        (tmp / "config.json").write_text(MODEL_CONFIG)
    assert plain.stat().st_ino != inode
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "config.json").write_text(MODEL_CONFIG)
    (volume / "old.safetensors").write_text("x")
    monkeypatch.setattr(checkpoint.os.path, "ismount", lambda p: os.fspath(p) == os.fspath(volume))
    inode = volume.stat().st_ino
    with atomic_output(volume, overwrite=True) as tmp:
        (tmp / "config.json").write_text('{"model_type": "new"}')
        (tmp / "sub").mkdir()
    assert volume.stat().st_ino == inode and sorted(p.name for p in volume.iterdir()) == ["config.json", "sub"]
    assert json.loads((volume / "config.json").read_text())["model_type"] == "new"
    (volume / "config.json").unlink()
    (volume / "notes.txt").write_text("mine")  # a mount point of other work is refused as any folder is
    with pytest.raises(OutputExistsError, match="holds other files"):
        with atomic_output(volume, overwrite=True):
            pass
    with pytest.raises(RuntimeError):  # a failed output leaves the folder as it was, without the partial
        with atomic_output(shared, overwrite=True) as tmp:
            raise RuntimeError
    assert sorted(p.name for p in shared.iterdir()) == ["config.json", "model.safetensors"]


def test_an_output_where_nothing_can_be_written_is_refused_before_the_work(tmp_path, monkeypatch):
    """Review: a read-only --out was found only after the models were evaluated (compare, eval safety)."""
    import os

    from safemerge.checkpoint import check_output_folder
    from safemerge.errors import SafemergeError

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.fspath(p) == str(locked) else real(p, mode, **kw))
    for check in (lambda o: check_output_file(o), lambda o: check_output_folder(o, "x")):
        with pytest.raises(SafemergeError, match=r"locked cannot be written in \(no permission, or a read-only filesystem\)"):
            check(locked / "sub" / "out.jsonl")
    check_output_file(tmp_path / "free" / "out.jsonl")  # a folder to be made under a writable one is fine
