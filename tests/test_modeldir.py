"""The model directory is the record of every ID handed out: what may replace it, and who may extend it.

Uses the bundled goodbooks sample (shipped in data/), so it runs on a fresh clone without ../shared.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from semid.cli import BUNDLED_SAMPLE, main
from semid.sources import read_items
from semid.modeldir import REGISTRY_LOCK, ModelDirError, check_save_target, registry_lock, replace_dir
from semid.tokenizer import SemanticIdTokenizer, UnnamedItemsWarning

N_FIT = 400


@pytest.fixture(scope="module")
def items():
    table = read_items(BUNDLED_SAMPLE)
    return table.ids, table.embeddings


@pytest.fixture(scope="module")
def fitted(items, tiny_config, tmp_path_factory) -> Path:
    ids, x = items
    tok = SemanticIdTokenizer(tiny_config({"train.steps": 30, "train.decoder_refit_steps": 0}))
    tok.fit(x[:N_FIT], ids=ids[:N_FIT])
    return tok.save(tmp_path_factory.mktemp("fitted") / "model")


@pytest.fixture
def model(fitted, tmp_path) -> Path:
    """A private copy of the fitted model directory."""
    return Path(shutil.copytree(fitted, tmp_path / "model"))


def _frame(ids, x) -> pl.DataFrame:
    return pl.DataFrame({"item_id": ids, "embedding": pl.Series(x.tolist(), dtype=pl.List(pl.Float32))})


# ---- what a save may replace ----------------------------------------------------------------------


def test_save_refuses_what_is_not_a_model_and_replaces_a_model_only_when_asked(model, tmp_path):
    tok = SemanticIdTokenizer.load(model)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ModelDirError, match="not a semid model; refusing"):
        tok.save(precious, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ModelDirError, match="existing file"):
        tok.save(a_file)
    with pytest.raises(ModelDirError, match="already holds a semid model"):
        tok.save(model)
    (tmp_path / "empty").mkdir()
    assert tok.save(tmp_path / "empty").joinpath("model.pt").is_file()  # an empty directory is fine
    before = (model / "model.pt").stat().st_ino
    tok.save(model, overwrite=True)
    assert (model / "model.pt").stat().st_ino != before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or retired copies left


def test_save_refuses_the_current_directory(model, tmp_path, monkeypatch):
    monkeypatch.chdir(model)
    with pytest.raises(ModelDirError, match="current directory"):
        check_save_target(".", overwrite=True)
    with pytest.raises(ModelDirError, match="current directory"):
        check_save_target(model.parent, overwrite=True)


def test_saved_directory_mode_follows_the_umask(model, tmp_path):
    old = os.umask(0o022)
    try:
        target = SemanticIdTokenizer.load(model).save(tmp_path / "shared_model")
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o755  # readable by the services that encode with it


def test_train_checks_its_output_before_training(items, tmp_path, monkeypatch, capsys):
    def no_training(*args, **kwargs):
        raise AssertionError("training started although the output cannot be written")

    monkeypatch.setattr(SemanticIdTokenizer, "fit", no_training)
    data = tmp_path / "items.npy"
    np.save(data, items[1][:50])
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory would have to be")
    for out, problem in ((precious, "refusing to replace it"), (blocker / "model", "cannot write a model directory")):
        assert main(["train", "--data", str(data), "--out", str(out)]) == 1
        assert problem in capsys.readouterr().err
    assert (precious / "notes.txt").read_text() == "keep me"


def test_train_overwrite_flag_replaces_a_model(items, model, tmp_path, capsys, tiny_config):
    data = tmp_path / "items.npy"
    np.save(data, items[1][:300])
    config = tmp_path / "tiny.toml"
    config.write_text(tiny_config({"train.steps": 5, "train.decoder_refit_steps": 0}).to_toml())
    args = ["train", "--config", str(config), "--data", str(data), "--out", str(model)]
    assert main(args) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert json.loads((model / "meta.json").read_text())["n_train_items"] == 300


# ---- the registry: saved before any output, and one writer at a time ------------------------------


def test_encode_records_new_ids_before_writing_the_output(items, model, tmp_path, monkeypatch, capsys):
    from semid.registry import IdRegistry

    ids, x = items
    new = tmp_path / "new.parquet"
    _frame(ids[N_FIT : N_FIT + 100], x[N_FIT : N_FIT + 100]).write_parquet(new)

    def failing_save(self, path):
        raise OSError("disk full")

    monkeypatch.setattr(IdRegistry, "save", failing_save)
    out = tmp_path / "ids.parquet"
    assert main(["encode", "--model", str(model), "--data", str(new), "--out", str(out)]) == 1
    assert "disk full" in capsys.readouterr().err
    assert not out.exists()  # no output whose IDs the registry does not hold
    monkeypatch.undo()
    assert main(["encode", "--model", str(model), "--data", str(new), "--out", str(out)]) == 0
    assert len(pl.read_parquet(model / "registry.parquet")) == N_FIT + 100


def test_saving_a_registry_removes_what_a_killed_save_left(items, model, tmp_path):
    left = model / ".registry.tmp-0123456789ab.parquet"  # kill -9 before the rename
    left.write_bytes(b"x" * 1000)
    ids, x = items
    tok = SemanticIdTokenizer.load(model)
    tok.encode(_frame(ids[N_FIT : N_FIT + 5], x[N_FIT : N_FIT + 5]))
    tok.save_registry(model)
    assert not left.exists() and SemanticIdTokenizer.load(model).registry.lookup(ids[N_FIT : N_FIT + 5])[0].all()


def test_a_registry_that_changed_since_loading_is_not_overwritten(items, model):
    ids, x = items
    first, second = SemanticIdTokenizer.load(model), SemanticIdTokenizer.load(model)
    first.encode(x[N_FIT : N_FIT + 50], ids=ids[N_FIT : N_FIT + 50])
    first.save_registry(model)
    second.encode(x[N_FIT + 50 : N_FIT + 80], ids=ids[N_FIT + 50 : N_FIT + 80])
    with pytest.raises(ModelDirError, match="changed since this tokenizer loaded it"):
        second.save_registry(model)
    saved = pl.read_parquet(model / "registry.parquet")
    assert len(saved) == N_FIT + 50 and ids[N_FIT] in saved["key"].to_list()  # the first encode's items kept
    first.encode(x[N_FIT + 80 : N_FIT + 90], ids=ids[N_FIT + 80 : N_FIT + 90])
    first.save_registry(model)  # its own save updated its stamp: a second save of the same tokenizer is fine
    assert len(pl.read_parquet(model / "registry.parquet")) == N_FIT + 60


@pytest.mark.parametrize("spelling", ["same", "symlink", "dotdot"])
def test_saving_a_whole_model_back_cannot_drop_ids_registered_since_it_was_loaded(items, model, tmp_path, spelling):
    """save(overwrite=True) over the directory a tokenizer came from writes its registry back: refused, as
    save_registry is, when another encode registered items there meanwhile; the IDs it handed out stay. The
    directory is the same however its path is spelled when loading."""
    ids, x = items
    loaded_as = model
    if spelling == "symlink":
        loaded_as = tmp_path / "link"
        loaded_as.symlink_to(model, target_is_directory=True)
    elif spelling == "dotdot":
        (model.parent / "elsewhere").mkdir()
        loaded_as = model.parent / "elsewhere" / ".." / model.name
    stale = SemanticIdTokenizer.load(loaded_as)
    new = tmp_path / "new.parquet"
    _frame(ids[N_FIT : N_FIT + 40], x[N_FIT : N_FIT + 40]).write_parquet(new)
    assert main(["encode", "--model", str(model), "--data", str(new), "--out", str(tmp_path / "ids.parquet")]) == 0
    handed_out = pl.read_parquet(tmp_path / "ids.parquet")["codes"].to_list()
    stale.encode(x[N_FIT + 40 : N_FIT + 80], ids=ids[N_FIT + 40 : N_FIT + 80])  # would reuse those IDs
    with pytest.raises(ModelDirError, match="changed since this tokenizer loaded it"):
        stale.save(model, overwrite=True)
    reloaded = SemanticIdTokenizer.load(model)
    assert reloaded.encode(x[N_FIT : N_FIT + 40], ids=ids[N_FIT : N_FIT + 40]).tolist() == handed_out
    reloaded.save(model, overwrite=True)  # unchanged since it was loaded: saving back is fine, and twice
    reloaded.encode(x[N_FIT + 40 : N_FIT + 45], ids=ids[N_FIT + 40 : N_FIT + 45])
    reloaded.save(model, overwrite=True)
    assert len(pl.read_parquet(model / "registry.parquet")) == N_FIT + 45
    stale.save(tmp_path / "fork")  # a new directory is another model's record, and is not refused


def _hold_the_lock_in_another_process(model: Path) -> subprocess.Popen:
    """A process that takes the registry lock, prints "locked", and releases it when a line reaches its stdin."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from semid.modeldir import registry_lock
            with registry_lock({str(model)!r}):
                print("locked", flush=True)
                sys.stdin.readline()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )


def test_registry_lock_excludes_another_process(model, tmp_path):
    fcntl = pytest.importorskip("fcntl")
    holder = _hold_the_lock_in_another_process(model)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with open(model / REGISTRY_LOCK, "a") as handle:
            with pytest.raises(BlockingIOError):
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        holder.communicate("\n", timeout=60)
    with registry_lock(model), registry_lock(model):  # free again, and re-entrant within a process
        pass


def test_a_lock_waited_for_across_a_replace_of_the_directory_is_taken_on_the_new_lock_file(model, tmp_path):
    """save(overwrite=True) replaces the directory, lock file included: a process that waited on the old file
    must end up holding the lock of the file the directory has now, or two processes would hold "the" lock."""
    fcntl = pytest.importorskip("fcntl")
    import threading

    holder = _hold_the_lock_in_another_process(model)
    inside, release = threading.Event(), threading.Event()

    def waiter() -> None:
        with registry_lock(model):
            inside.set()
            release.wait(60)

    thread = threading.Thread(target=waiter)
    try:
        assert holder.stdout.readline().strip() == "locked"
        thread.start()
        assert not inside.wait(1.0)  # waiting on the old directory's lock file
        shutil.copytree(model, tmp_path / "staging")
        replace_dir(tmp_path / "staging", model)  # what save(overwrite=True) does: a new lock file
    finally:
        holder.communicate("\n", timeout=60)
    try:
        assert inside.wait(60)
        with open(model / REGISTRY_LOCK, "a") as handle:  # the lock file the directory has now is held
            with pytest.raises(BlockingIOError):
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        release.set()
        thread.join(60)


# ---- what a load accepts ----------------------------------------------------------------------------


def test_an_edited_or_emptied_config_is_refused(model):
    (model / "config.toml").write_text("")
    with pytest.raises(ModelDirError, match="config.toml is not the file this model was saved with"):
        SemanticIdTokenizer.load(model)


def test_weights_of_another_model_of_the_same_shape_are_refused(model, items, tmp_path):
    other = SemanticIdTokenizer.load(model)
    with warnings.catch_warnings():  # fit starts a new registry: bare rows there are no UnnamedItemsWarning
        warnings.simplefilter("error", UnnamedItemsWarning)
        other.fit(items[1][:N_FIT][::-1].copy())  # the same architecture, other weights
    other.save(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "model.pt", model / "model.pt")
    with pytest.raises(ModelDirError, match="model.pt is not the file this model was saved with"):
        SemanticIdTokenizer.load(model)


@pytest.mark.parametrize("digest_key", ["config_sha256", "weights_sha256"])
def test_a_model_saved_before_a_digest_still_loads(model, items, digest_key):
    meta = json.loads((model / "meta.json").read_text())
    del meta[digest_key]
    (model / "meta.json").write_text(json.dumps(meta))
    assert SemanticIdTokenizer.load(model).encode_raw(items[1][:5]).shape == (5, 3)


@pytest.mark.parametrize("damage, message", [
    (lambda m: (m / "meta.json").write_text(json.dumps({"format": "semid-model-v1"})), "has no input_dim"),
    (lambda m: __import__("torch").save({"x": [1, object]}, m / "model.pt"), "Python objects, not only tensors"),
    (lambda m: __import__("torch").save({"encoder.0.weight": __import__("torch").zeros(1)}, m / "model.pt"),
     "Missing key"),
])
def test_damaged_model_files_are_named_with_the_reason(model, damage, message):
    damage(model)
    with pytest.raises(ModelDirError, match=message) as info:
        SemanticIdTokenizer.load(model)
    assert "weights_only=False" not in str(info.value) and "\n" not in str(info.value)


def _edit_registry(model: Path, edit) -> None:
    frame = pl.read_parquet(model / "registry.parquet")
    ids = np.array(frame["id"].to_list())
    edit(ids)
    frame.with_columns(pl.Series("id", ids.tolist())).write_parquet(model / "registry.parquet")


@pytest.mark.parametrize("edit, message", [
    (lambda ids: ids.__setitem__((3, 1), 16), r"the ID of item '.*' holds 16 at position 2, outside \[0, 16\)"),
    (lambda ids: ids.__setitem__((3, 0), -1), r"holds -1 at position 1, outside \[0, 16\)"),
    (lambda ids: ids.__setitem__((5, -1), 2**30), r"holds 1073741824 at position 4, outside \[0, 16777216\)"),
    (lambda ids: ids.__setitem__(7, ids[2]), r"items '.*' and '.*' hold one ID, \[.*\]$"),
])
def test_a_registry_with_ids_the_model_cannot_have_given_is_refused(model, edit, message):
    """Flipped bits or an edit that breaks "no two items share an ID", or names codes no decoder knows."""
    _edit_registry(model, edit)
    with pytest.raises(ModelDirError, match=r"registry.parquet is damaged or edited: .*" + message):
        SemanticIdTokenizer.load(model)


def test_save_refuses_a_registry_that_load_would_refuse_and_keeps_a_lowered_suffix_size(model, items):
    """A suffix_size lowered after IDs above it were given still saves and loads (token_vocabulary allows it);
    a strategy changed from "none" after items shared IDs is refused by save, not found by a later load."""
    tok = SemanticIdTokenizer.load(model)
    assert tok.registry.ids[:, -1].max() >= 1  # suffixes in use
    tok.config = tok.config.with_overrides({"collisions.suffix_size": 1})
    SemanticIdTokenizer.load(tok.save(model.parent / "lowered"))
    tok.registry._ids[7] = tok.registry._ids[2]  # as strategy "none" would have given them
    with pytest.raises(ModelDirError, match=r"registry cannot be saved: items .* hold one ID"):
        tok.save(model.parent / "shared")
    assert not (model.parent / "shared").exists()


def test_encode_of_known_items_works_where_the_lock_cannot_be_created(items, model, tmp_path, capsys, monkeypatch):
    """A model directory the process cannot write (a model baked into a read-only image) still encodes the items
    it knows. Tests may run as root, who can write anywhere: the lock's name is taken by a directory, and the
    directory reads as read-only."""
    import semid.modeldir

    (model / REGISTRY_LOCK).mkdir()
    monkeypatch.setattr(semid.modeldir, "_can_write", lambda folder: False)
    ids, x = items
    known = tmp_path / "known.parquet"
    _frame(ids[:50], x[:50]).write_parquet(known)
    assert main(["encode", "--model", str(model), "--data", str(known), "--out", str(tmp_path / "ids.parquet")]) == 0
    assert "(0 new)" in capsys.readouterr().out


def test_a_lock_that_cannot_be_opened_in_a_writable_model_is_an_error(model):
    """Encoding on without the lock would let two encodes hand out the same IDs."""
    pytest.importorskip("fcntl")
    (model / REGISTRY_LOCK).mkdir()
    with pytest.raises(ModelDirError, match=r"cannot open the registry lock .*\.registry\.lock: .*same IDs"):
        with registry_lock(model):
            pass


def test_threads_of_one_process_take_turns_on_a_registry(model):
    """Two tokenizers of one model in two threads: the second waits for the first, as another process would;
    a thread that holds the lock takes it again."""
    pytest.importorskip("fcntl")
    import threading

    inside, release, order = threading.Event(), threading.Event(), []

    def first() -> None:
        with registry_lock(model):
            with registry_lock(model):  # re-entrant in its thread
                inside.set()
                release.wait(60)
                order.append("first")

    def second() -> None:
        inside.wait(60)
        with registry_lock(model):
            order.append("second")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    assert inside.wait(60)
    threads[1].join(0.5)
    assert threads[1].is_alive() and order == []  # waiting for the first thread
    release.set()
    for thread in threads:
        thread.join(60)
    assert order == ["first", "second"]


def test_a_replace_interrupted_between_its_renames_puts_the_old_model_back(model, tmp_path, monkeypatch):
    import semid.modeldir

    before = (model / "model.pt").read_bytes()
    staging = Path(shutil.copytree(model, tmp_path / "staging"))
    real_replace, calls = os.replace, []

    def interrupted(src, dst):  # Ctrl-C the moment the old model is aside, before the new one is in
        calls.append(src)
        real_replace(src, dst)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(semid.modeldir.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(staging, model)
    monkeypatch.undo()
    assert (model / "model.pt").read_bytes() == before
    assert not list(model.parent.glob(".model.old-*"))


def test_a_model_left_aside_by_a_killed_replace_is_pointed_to_not_shadowed(model, items, tiny_config):
    """A process killed between the two renames leaves no model at the path and the old one as .<name>.old-*:
    loading names where it is, and a new model may not be saved there over its registry's head."""
    left = model.parent / ".model.old-0123456789ab"
    os.replace(model, left)
    with pytest.raises(ModelDirError, match=r"model directory not found: .*a replace of it was interrupted, and "
                                            r"its previous model is in .*\.model\.old-0123456789ab"):
        SemanticIdTokenizer.load(model)
    with pytest.raises(ModelDirError, match=r"interrupted.*rename that back"):
        check_save_target(model)
    os.replace(left, model)
    check_save_target(model, overwrite=True)


def test_a_file_given_as_the_model_is_named_as_a_file(model, tmp_path):
    with pytest.raises(ModelDirError, match=r"model directory not found: .*model.pt \(it is a file: a model is the "
                                            r"directory semid train --out wrote\)$"):
        SemanticIdTokenizer.load(model / "model.pt")
    with pytest.raises(ModelDirError, match=r"model directory not found: .*absent$"):
        SemanticIdTokenizer.load(tmp_path / "absent")


def test_a_refitted_tokenizer_cannot_save_its_registry_over_the_old_model(items, model):
    ids, x = items
    tok = SemanticIdTokenizer.load(model)
    before = (model / "registry.parquet").read_bytes()
    tok.fit(x[N_FIT : 2 * N_FIT], ids=ids[N_FIT : 2 * N_FIT])
    with pytest.raises(ModelDirError, match="holds another model than this tokenizer"):
        tok.save_registry(model)
    fresh = SemanticIdTokenizer(tok.config)
    with pytest.raises(ModelDirError, match="holds another model"):
        fresh.save_registry(model)
    assert (model / "registry.parquet").read_bytes() == before



def test_a_lock_file_another_user_made_read_only_still_locks():
    """In a shared model directory the lock file may be another user's, mode 0644: flock needs no write access,
    so encodes there lock it rather than fail. As root (who may write anything) a child takes the lock as nobody."""
    pytest.importorskip("fcntl")
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="semid-shared-", dir="/tmp"))
    try:
        os.chmod(folder, 0o777)  # the shared, writable model directory
        (folder / REGISTRY_LOCK).touch()
        os.chmod(folder / REGISTRY_LOCK, 0o444 if os.geteuid() else 0o644)
        pid = os.fork()
        if pid == 0:  # the child: another user, where the test runs as root
            status = 1
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                with registry_lock(folder):
                    status = 0
            finally:
                os._exit(status)
        assert os.waitpid(pid, 0)[1] == 0, "the lock could not be taken"
    finally:
        shutil.rmtree(folder)


def test_a_save_over_the_directory_under_its_own_lock_relocks_the_new_lock_file(model, fitted):
    """The outer flock is on the replaced directory's lock file; a nested lock must take the new one."""
    fcntl = pytest.importorskip("fcntl")
    other = SemanticIdTokenizer.load(fitted)
    with registry_lock(model):
        other.save(model, overwrite=True)
        with registry_lock(model):
            with open(model / REGISTRY_LOCK) as handle:
                with pytest.raises(BlockingIOError):  # held: by this process, on the new file
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_replacing_a_model_waits_for_an_encode_that_holds_its_registry(model, fitted, tmp_path):
    """An encode registering items holds the lock; `save(overwrite=True)` of another model over the directory
    waits for it, so the encode cannot write the old registry into the new model after the replace."""
    pytest.importorskip("fcntl")
    import threading

    other = SemanticIdTokenizer.load(fitted)
    holder = _hold_the_lock_in_another_process(model)
    saved = threading.Event()
    thread = threading.Thread(target=lambda: (other.save(model, overwrite=True), saved.set()))
    try:
        assert holder.stdout.readline().strip() == "locked"
        thread.start()
        assert not saved.wait(1.0)  # waiting for the encode's lock
    finally:
        holder.communicate("\n", timeout=60)
    thread.join(60)
    assert saved.is_set()


def _rewrite_config(model: Path, edit) -> None:
    """Edit a saved config as an earlier semid would have written it, with the digest meta.json records."""
    import hashlib

    path = model / "config.toml"
    path.write_text(edit(path.read_text()))
    meta = json.loads((model / "meta.json").read_text())
    meta["config_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (model / "meta.json").write_text(json.dumps(meta))


def test_a_model_saved_with_values_a_run_now_refuses_still_loads(model, items):
    """Seed -1 and early stopping without evaluations were accepted before: their registries must stay usable."""
    import re

    _rewrite_config(model, lambda text: re.sub(r"(?m)^seed = .*$", "seed = -1", text))
    ids, x = items
    tok = SemanticIdTokenizer.load(model)
    assert tok.config.train.seed == -1 and len(tok.encode(x[:5], ids=ids[:5])) == 5


def test_a_saved_config_that_cannot_be_used_is_named_as_the_models(model):
    import re

    _rewrite_config(model, lambda text: re.sub(r"(?m)^distance = .*$", 'distance = "manhattan"', text))
    with pytest.raises(ModelDirError, match=r"model/config.toml cannot be used: config key 'quantizer.distance'"):
        SemanticIdTokenizer.load(model)


def test_two_saves_to_one_new_path_do_not_both_succeed(model, fitted, tmp_path, monkeypatch):
    """Both find the path free; the second to finish must not replace the first one's model (and registry)."""
    import semid.tokenizer

    first, second = SemanticIdTokenizer.load(fitted), SemanticIdTokenizer.load(model)
    target = tmp_path / "new"
    real_staging = semid.tokenizer.staging_dir

    def staging_after_another_save(where):  # the other save lands between this one's check and its rename
        monkeypatch.setattr(semid.tokenizer, "staging_dir", real_staging)
        first.save(target)
        return real_staging(where)

    monkeypatch.setattr(semid.tokenizer, "staging_dir", staging_after_another_save)
    with pytest.raises(ModelDirError, match="was written by another save meanwhile; refusing to replace it"):
        second.save(target)
    assert SemanticIdTokenizer.load(target).registry.keys.to_list() == first.registry.keys.to_list()
    assert not list(tmp_path.glob(".new.*"))  # the refused save's staging directory is gone


def test_a_model_is_never_saved_inside_another(model, fitted):
    """`train --overwrite` of the outer model would delete the inner one, registry and all."""
    with pytest.raises(ModelDirError, match=r"is inside the semid model directory .*model; save next to it"):
        SemanticIdTokenizer.load(fitted).save(model / "inner")


def test_an_empty_directory_does_not_hide_a_model_a_killed_replace_left(model):
    os.replace(model, model.parent / ".model.old-0123456789ab")
    model.mkdir()
    with pytest.raises(ModelDirError, match=r"interrupted.*rename that back"):
        check_save_target(model)
