"""The `semid` command (issue #4), run as a real subprocess: round trip, help, and bad inputs.

Each subprocess pays the torch import (seconds on a small machine), so the model is trained once per
module, every bad-input case runs through `semid.cli.main` in-process, and a sample of them runs again
as real commands, concurrently.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from semid.modeldir import REGISTRY_LOCK

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
_SCRIPT = Path(sys.executable).with_name("semid")
SEMID = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "semid.cli"]
DESIGN_KEYS = {"mse", "fvu", "cosine", "collision_rate", "colliding_items", "max_group", "usage", "entropy_bits",
               "prefix_agreement", "unique_after", "id_length", "sequence_prefix_agreement"}
TINY_TOML = """\
[model]
hidden = [64]
latent_dim = 16
latent_norm = 0.0

[quantizer]
levels = 3
codebook_size = 16
distance = "l2"
balance_weight = 0.0

[train]
device = "cpu"
steps = 80
min_epochs = 0
max_steps = 0
batch_size = 256
lr = 0.003
eval_every = 40
progress = false
norm_sampling = 0.0
weight_decay = 0.0
uniqueness_weight = 0.0
"""  # every key on which the neutral defaults and the recipe differ, so no PartialConfigWarning


def semid(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    # One torch thread per process: several of these run at once on a small machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([*SEMID, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _frame(x: np.ndarray, ids: list[str]) -> pl.DataFrame:
    return pl.DataFrame({"item_id": ids, "embedding": pl.Series(x.tolist(), dtype=pl.List(pl.Float32))})


def _digest(directory: Path) -> dict[str, str]:
    """The model's files; not the empty lock file the first `semid encode` of a directory leaves behind."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())
            if p.name != REGISTRY_LOCK}


@pytest.fixture(scope="module")
def work(real_data, tmp_path_factory) -> dict[str, Path]:
    """Inputs (ml-100k as parquet with its real ids, and as .npy), a tiny config, and a trained model."""
    x = real_data("ml-100k")
    ids = pl.read_parquet(DATA_DIR / "ml-100k.items.parquet")["item_id"].to_list()
    root = tmp_path_factory.mktemp("cli")
    paths = {"root": root, "config": root / "tiny.toml", "parquet": root / "items.parquet",
             "npy": root / "items.npy", "model": root / "model"}
    paths["config"].write_text(TINY_TOML)
    _frame(x, ids).write_parquet(paths["parquet"])
    np.save(paths["npy"], x)
    result = semid("train", "--config", paths["config"], "--data", paths["parquet"], "--out", paths["model"],
                   cwd=root)
    assert result.returncode == 0, result.stderr
    paths["train_stdout"] = result.stdout  # type: ignore[assignment]
    return paths


# ---- round trip --------------------------------------------------------------------------------


def test_evaluate_without_matplotlib_refuses_a_plot_before_any_work(work, tmp_path, capsys, monkeypatch):
    from semid import cli

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import now raises ImportError
    monkeypatch.setattr(cli, "_read_training_items", lambda *a: pytest.fail("read the data to evaluate"))
    report = tmp_path / "report.json"
    assert cli.main(["evaluate", "--model", str(work["model"]), "--data", str(work["npy"]), "--json", str(report),
                     "--plot", str(tmp_path / "usage.png")]) == 1
    assert capsys.readouterr().err == ("semid evaluate: error: semid plots need matplotlib, which the optional "
                                       "extra brings: pip install 'semid[plot]'\n")
    assert not report.exists()


def test_demo_checks_its_paths_before_training(tmp_path, capsys, monkeypatch):
    from semid import cli

    monkeypatch.setattr(cli, "_read_training_items", lambda *a: pytest.fail("read the data for training"))
    (tmp_path / "a_file").write_text("")
    assert cli.main(["demo", "--out", str(tmp_path / "a_file")]) == 1
    assert "--out " + str(tmp_path / "a_file") + " is a file; name a directory" in capsys.readouterr().err
    out = tmp_path / "demo"
    out.mkdir()
    shutil.copy(cli.BUNDLED_SAMPLE, out / "ids.parquet")
    assert cli.main(["demo", "--data", str(out / "ids.parquet"), "--out", str(out)]) == 1
    assert "is inside --out" in capsys.readouterr().err
    parts = tmp_path / "parts"
    parts.mkdir()
    shutil.copy(cli.BUNDLED_SAMPLE, parts / "part-0.parquet")
    assert cli.main(["demo", "--data", str(parts), "--out", str(parts / "demo")]) == 1
    assert "ids.parquet where the next run would read it as a part of --data" in capsys.readouterr().err
    assert not (parts / "demo").exists()


def test_demo_runs_the_main_job_on_the_bundled_sample(tmp_path, capsys):
    """`semid demo` (the README's first command) trains, encodes, evaluates and reports on the bundled
    goodbooks sample; here with a tiny model and a few steps, the demo's own schedule being a minute."""
    from semid.cli import main

    out = tmp_path / "demo"
    tiny = ["model.hidden=[64]", "model.latent_dim=16", "train.steps=30", "train.eval_every=30",
            "train.progress=false", "train.decoder_refit_steps=0"]
    assert main(["demo", "--out", str(out), "--device", "cpu", *[f"--set={s}" for s in tiny]]) == 0
    printed = capsys.readouterr().out
    assert "semid demo: 10000 items of dimension 384" in printed and "(cpu, " in printed
    assert {p.name for p in out.iterdir()} == {"model", "ids.parquet", "trie.json", "vocab.txt", "report.json"}
    ids = pl.read_parquet(out / "ids.parquet")
    assert ids.height == 10_000 and ids["semantic_id"].n_unique() == 10_000  # no two books share an ID
    report = json.loads((out / "report.json").read_text())
    assert DESIGN_KEYS - {"sequence_prefix_agreement"} <= report.keys() and report["unique_after"] == 1.0
    assert f"fvu (fraction of variance unexplained)  {report['fvu']:.4f}" in printed


def test_train_encode_evaluate_round_trip(work):
    root, model = work["root"], work["model"]
    assert {p.name for p in model.iterdir()} == {"config.toml", "model.pt", "meta.json", "registry.parquet"}
    assert "model saved" in work["train_stdout"]
    meta = json.loads((model / "meta.json").read_text())
    final = meta["final"]
    assert final["step"] == meta["best_step"]
    assert f"fvu {final['fvu']:.4f}" in work["train_stdout"]  # the figure of the model that was saved
    assert meta["train_device"] == "cpu" and meta["train_precision"] in ("fp32", "bf16 autocast")
    assert f"(cpu, {meta['train_precision']})" in work["train_stdout"]
    assert f"with the config {work['config']}; model saved" in work["train_stdout"]

    out = root / "ids.parquet"
    trie_path, vocab_path = root / "trie.json", root / "vocab.txt"
    result = semid("encode", "--model", model, "--data", work["parquet"], "--out", out, "--quiet",
                   "--trie", trie_path, "--vocab", vocab_path, cwd=root)
    assert result.returncode == 0, result.stderr
    frame = pl.read_parquet(out)
    source = pl.read_parquet(work["parquet"])
    assert frame.columns == ["item_id", "codes", "semantic_id", "tokens"]
    letters = "abcd"
    assert frame["tokens"].to_list() == ["".join(f"<{letters[i]}_{v}>" for i, v in enumerate(c)) for c in frame["codes"].to_list()]
    trie = json.loads(trie_path.read_text())
    first_codes = sorted({c[0] for c in frame["codes"].to_list()})
    assert trie[""] == first_codes  # the root lists exactly the first codes in use
    vocab = vocab_path.read_text(encoding="utf-8").splitlines()
    assert set(re.findall(r"<[a-d]_\d+>", "".join(frame["tokens"].to_list()))) <= set(vocab)
    from semid.tokenizer import SemanticIdTokenizer

    suffixes = SemanticIdTokenizer.load(model).config.collisions.suffix_size
    assert vocab == [f"<{letter}_{c}>" for letter, k in zip("abcd", [16, 16, 16, suffixes]) for c in range(k)]
    assert frame["item_id"].to_list() == source["item_id"].to_list()
    codes = frame["codes"].to_list()
    assert {len(c) for c in codes} == {4}  # 3 levels + the suffix
    assert frame["semantic_id"].to_list() == ["-".join(map(str, c)) for c in codes]
    assert frame["semantic_id"].n_unique() == frame.height
    assert all(0 <= v < 16 for c in codes for v in c[:3])

    # The CLI agrees with the Python API on the same saved model.
    api = SemanticIdTokenizer.load(model).encode(source)
    np.testing.assert_array_equal(np.array(codes), api)

    report_path = root / "report.json"
    sequences = DATA_DIR / "ml-100k_sequences.txt"
    result = semid("evaluate", "--model", model, "--data", work["parquet"], "--json", report_path,
                   "--sequences", sequences, "--quiet", cwd=root)
    assert result.returncode == 0, result.stderr
    assert "fvu" in result.stdout
    report = json.loads(report_path.read_text())
    assert DESIGN_KEYS <= report.keys()
    assert report["unique_after"] == 1.0
    assert report["id_length"] == 4
    assert 0 < report["fvu"] < 1
    for key in ("usage", "entropy_bits", "prefix_agreement", "sequence_prefix_agreement"):
        assert len(report[key]) == 3, key


def test_evaluate_reads_sequences_from_an_interaction_log(work, tmp_path, capsys):
    """An interaction log (user, item id, time), shuffled and with items the catalogue lacks, gives the
    sequence_prefix_agreement of the row-number sequences file it was made from."""
    from semid.cli import main
    from semid.metrics import read_sequences

    ids = pl.read_parquet(work["parquet"])["item_id"]
    rows = [(f"user{u}", ids[int(r)], t) for u, seq in enumerate(read_sequences(DATA_DIR / "ml-100k_sequences.txt"))
            for t, r in enumerate(seq)]
    log = pl.DataFrame(rows, schema=["user", "item_id", "when"], orient="row")
    strangers = pl.DataFrame({"user": ["user0"] * 5, "item_id": [f"gone{i}" for i in range(5)], "when": [3] * 5})
    pl.concat([log, strangers]).sample(fraction=1.0, shuffle=True, seed=0).write_csv(tmp_path / "log.csv")
    reports = {}
    for name, args in {"sequences": ["--sequences", str(DATA_DIR / "ml-100k_sequences.txt")],
                       "interactions": ["--interactions", str(tmp_path / "log.csv"), "--user-col", "user",
                                        "--time-col", "when"]}.items():
        out = tmp_path / f"{name}.json"
        assert main(["evaluate", "--model", str(work["model"]), "--data", str(work["parquet"]), "--json", str(out),
                     "--quiet", *args]) == 0
        reports[name] = json.loads(out.read_text())["sequence_prefix_agreement"]
    assert reports["interactions"] == reports["sequences"]
    assert f"from {len(rows) + 5:,} interactions (5 with items outside the catalogue skipped)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # one source of sequences or the other
        main(["evaluate", "--model", str(work["model"]), "--data", str(work["parquet"]), "--sequences", "s.txt",
              "--interactions", "log.csv"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_npy_encode_extends_the_saved_registry(work, tmp_path):
    """A .npy has no ids: rows are new items to a model trained with ids, numbered by row in the output,
    and the registry saved by the first encode gives them the same IDs the second time."""
    model = tmp_path / "model"
    shutil.copytree(work["model"], model)
    first, second = tmp_path / "first.parquet", tmp_path / "second.parquet"
    runs = [semid("encode", "--model", model, "--data", work["npy"], "--out", out, "--batch-size", "500", cwd=tmp_path)
            for out in (first, second)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr + runs[1].stderr
    # nothing but errors and warnings on stderr when it is not a terminal: the first run is warned that rows
    # without ids cannot match items the registry knows by id; by the second, the registry holds these rows
    assert runs[0].stderr.startswith("semid encode: warning: this model's registry knows its items by id")
    assert runs[0].stderr.count("\n") == 1 and runs[1].stderr == ""
    n = len(np.load(work["npy"], mmap_mode="r"))
    assert f"({n} new)" in runs[0].stdout and "(0 new)" in runs[1].stdout
    frame = pl.read_parquet(first)
    assert frame.equals(pl.read_parquet(second))
    assert frame["item_id"].to_list() == list(range(n))
    old = set(map(tuple, pl.read_parquet(work["model"] / "registry.parquet")["id"].to_list()))
    new = set(map(tuple, frame["codes"].to_list()))
    assert len(old) == len(new) == n
    assert not old & new


def test_a_warehouse_export_in_shards_encodes_and_evaluates_as_the_one_file_does(work, tmp_path, capsys):
    """A directory of parquet parts, or a quoted glob of them, is the catalogue they make together: the same IDs
    and the same report as the single file. An output that the next run would read as a shard is refused."""
    from semid.cli import main

    whole = pl.read_parquet(work["parquet"])
    export = tmp_path / "export"
    for i, start in enumerate(range(0, whole.height, 700)):  # parts of 700 rows: batches of 500 straddle them
        (export / f"day={i}").mkdir(parents=True)
        whole.slice(start, 700).write_parquet(export / f"day={i}" / f"part-{i:05d}.parquet")
    (export / "_SUCCESS").write_text("")
    outputs = {}
    for name, data in (("file", work["parquet"]), ("folder", export), ("pattern", export / "day=*" / "*.parquet")):
        model = tmp_path / f"model-{name}"
        shutil.copytree(work["model"], model)
        out = tmp_path / f"{name}.parquet"
        assert main(["encode", "--model", str(model), "--data", str(data), "--out", str(out), "--batch-size",
                     "500"]) == 0
        report = tmp_path / f"{name}.json"
        assert main(["evaluate", "--model", str(model), "--data", str(data), "--json", str(report)]) == 0
        outputs[name] = (pl.read_parquet(out), json.loads(report.read_text()))
    capsys.readouterr()
    for name in ("folder", "pattern"):
        assert outputs[name][0].equals(outputs["file"][0])
        assert outputs[name][1] == outputs["file"][1]
    for data, out in ((export, export / "day=9" / "ids.parquet"), (export / "day=*" / "*.parquet",
                                                                   export / "day=9" / "ids.parquet")):
        assert main(["encode", "--model", str(work["model"]), "--data", str(data), "--out", str(out)]) == 1
        assert "would be read as a part of the input --data" in capsys.readouterr().err
        assert not out.parent.exists()
    from semid.io import InputError
    from semid.tokenizer import SemanticIdTokenizer

    with pytest.raises(InputError, match=r"ids\.parquet would be read as a part of the input .*export \(3 parquet files\)"):
        SemanticIdTokenizer.load(work["model"]).encode_file(export, export / "ids.parquet", progress=False)


def test_info_describes_a_model_without_data(work, tmp_path):
    """What a model directory holds, read from it alone: the figures are the saved model's own."""
    model = tmp_path / "model"
    shutil.copytree(work["model"], model)
    semid("encode", "--model", model, "--data", work["npy"], "--out", tmp_path / "ids.parquet", cwd=tmp_path)
    result = semid("info", "--model", model, "--json", tmp_path / "info.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    meta = json.loads((model / "meta.json").read_text())
    info = json.loads((tmp_path / "info.json").read_text())
    registered = pl.read_parquet(model / "registry.parquet").height
    assert registered == 2 * meta["n_train_items"]  # the .npy rows are new items beside the trained ids
    assert info["registered_items"] == registered and info["trained_items"] == meta["n_train_items"]
    assert info["final"] == meta["final"] and info["best_step"] == meta["best_step"]
    assert info["train_steps"] == meta["train_steps"] > 0
    assert f", {meta['train_steps']:,} steps, best step {meta['best_step']}" in result.stdout
    assert info["codebook_sizes"] == meta["codebook_sizes"] == [16, 16, 16]
    assert info["id_length"] == 4 and info["collision_strategy"] == "suffix"
    assert info["model"] == "rqvae: 384 -> 64 -> 16"
    assert "3 levels of 16/16/16 codes + a suffix of up to" in result.stdout
    assert f"{registered:,} items hold an ID" in result.stdout
    assert f"fvu (fraction of variance unexplained)  {meta['final']['fvu']:.4f}" in result.stdout


def test_info_gives_the_id_length_a_remap_model_fell_back_to(work, tmp_path, capsys):
    """remap keeps IDs at L codes until a prefix fills up; then the registry fixes L + 1 (a suffix)."""
    from semid.cli import main

    tiny = ["--set", "model.type=rqkmeans", "--set", "quantizer.levels=2", "--set", "quantizer.codebook_size=4",
            "--set", "collisions.strategy=remap", "--set", "train.progress=false"]
    assert main(["train", "--data", str(work["npy"]), "--out", str(tmp_path / "m"), *tiny]) == 0
    assert main(["info", "--model", str(tmp_path / "m"), "--json", str(tmp_path / "info.json")]) == 0
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["id_length"] == 3 == pl.read_parquet(tmp_path / "m" / "registry.parquet")["id"].list.len()[0]
    assert "2 levels of 4/4 codes + a suffix of up to 256: 3 tokens, collisions by remap" in capsys.readouterr().out


def test_train_refuses_inputs_inside_the_directory_it_replaces(work, tmp_path, capsys):
    """`--overwrite` replaces --out whole: an input kept there would be deleted with the old model. Outputs
    may all be /dev/null, which is not a file they could overwrite in each other (checked, not written: the
    writing is test_atomic's, on a pipe of its own)."""
    from semid.cli import main

    model = tmp_path / "m"
    shutil.copytree(work["model"], model)
    shutil.copy(work["npy"], model / "items.npy")
    assert main(["train", "--config", str(work["config"]), "--data", str(model / "items.npy"), "--out", str(model),
                 "--overwrite"]) == 1
    assert f"--data {model / 'items.npy'} is inside --out {model}, which training replaces" in capsys.readouterr().err
    assert (model / "items.npy").is_file() and (model / "model.pt").is_file()
    from semid.cli import build_parser, check_output_paths

    check_output_paths(build_parser().parse_args(["encode", "--model", str(model), "--data", str(work["npy"]),
                                                  "--out", str(tmp_path / "ids.parquet"),
                                                  "--trie", os.devnull, "--vocab", os.devnull]))


# ---- help ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["train"], ["encode"], ["evaluate"], ["info"], ["demo"], ["embed"]])
def test_help_exits_zero(command, tmp_path):
    result = semid(*command, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: semid")


def test_missing_subcommand_fails(tmp_path):
    result = semid(cwd=tmp_path)
    assert result.returncode != 0
    assert "usage" in result.stderr


# ---- bad inputs -----------------------------------------------------------------------------------

# name -> (arguments, pattern the one stderr line must contain). {x} names files made by `bad_runs`.
BAD_CASES = {
    "train-nan": (["train", "--config", "{config}", "--data", "{nan}", "--out", "{out}"], "NaN"),
    "train-inf": (["train", "--config", "{config}", "--data", "{inf}", "--out", "{out}"], "inf"),
    "train-duplicate-ids": (["train", "--config", "{config}", "--data", "{dup}", "--out", "{out}"], "more than once"),
    "train-unknown-key": (["train", "--config", "{typo_config}", "--data", "{npy}", "--out", "{out}"],
                          "unknown config key 'quantizer.codebok_size'"),
    "train-unknown-set-key": (["train", "--config", "{config}", "--set", "train.stpes=5", "--data", "{npy}",
                               "--out", "{out}"], "unknown config key 'train.stpes'"),
    "train-bad-choice": (["train", "--config", "{config}", "--set", "quantizer.distance=manhattan", "--data",
                          "{npy}", "--out", "{out}"], "quantizer.distance"),
    "train-set-two-lines": (["train", "--config", "{config}", "--set", "train.steps=30\nlr=1", "--data", "{npy}",
                             "--out", "{out}"], "--set train.steps= takes one value, got '30\\nlr=1'"),
    "train-config-directory": (["train", "--config", "{root}", "--data", "{npy}", "--out", "{out}"],
                               "is a directory; name a .toml file"),
    "train-missing-file": (["train", "--config", "{config}", "--data", "{root}/absent.npy", "--out", "{out}"],
                           "not found"),
    "encode-nan-parquet": (["encode", "--model", "{model}", "--data", "{nan_parquet}", "--out", "{out}",
                            "--batch-size", "100"], "NaN"),
    "encode-inf": (["encode", "--model", "{model}", "--data", "{inf}", "--out", "{out}"], "inf"),
    "encode-wrong-dimension": (["encode", "--model", "{model}", "--data", "{dim100}", "--out", "{out}"],
                               "dimension"),
    "encode-empty": (["encode", "--model", "{model}", "--data", "{empty}", "--out", "{out}"], "empty"),
    "encode-duplicate-ids": (["encode", "--model", "{model}", "--data", "{dup}", "--out", "{out}",
                              "--batch-size", "100"], "dup.parquet must be unique"),  # repeats across batches
    "encode-same-columns": (["encode", "--model", "{model}", "--data", "{parquet}", "--emb-col", "item_id",
                             "--out", "{out}"], "the id column and the embedding column of"),
    "encode-missing-column": (["encode", "--model", "{model}", "--data", "{parquet}", "--emb-col", "vector",
                               "--out", "{out}"], "column 'vector'"),
    "encode-truncated-weights": (["encode", "--model", "{truncated}", "--data", "{npy}", "--out", "{out}"],
                                 "model.pt"),
    "encode-no-meta": (["encode", "--model", "{no_meta}", "--data", "{npy}", "--out", "{out}"], "meta.json"),
    "encode-foreign-dir": (["encode", "--model", "{foreign}", "--data", "{npy}", "--out", "{out}"],
                           "not a semid model directory"),
    "evaluate-nan": (["evaluate", "--model", "{model}", "--data", "{nan}", "--json", "{out}"], "NaN"),
    "evaluate-wrong-dimension": (["evaluate", "--model", "{model}", "--data", "{dim100}", "--json", "{out}"],
                                 "dimension"),
    "info-truncated-weights": (["info", "--model", "{truncated}", "--json", "{out}"], "model.pt"),
    # Outputs that would overwrite an input, another output, or the model directory's files: refused up front
    "encode-out-into-model": (["encode", "--model", "{model}", "--data", "{npy}", "--out", "{model}/registry.parquet",
                               "--trie", "{out}"], "is inside the model directory"),
    "encode-vocab-is-input": (["encode", "--model", "{model}", "--data", "{parquet}", "--out", "{out}",
                               "--vocab", "{parquet}"], "is the input --data"),
    "encode-trie-is-out": (["encode", "--model", "{model}", "--data", "{npy}", "--out", "{out}", "--trie", "{out}"],
                           "is the output --out"),
    "evaluate-json-is-input": (["evaluate", "--model", "{model}", "--data", "{npy}", "--json", "{npy}",
                                "--plot", "{out}"], "is the input --data"),
    "info-json-into-model": (["info", "--model", "{model}", "--json", "{model}/meta.json"], "inside the model directory"),
    "train-checkpoint-into-out": (["train", "--config", "{config}", "--data", "{npy}", "--out", "{out}",
                                   "--checkpoint", "{out}/train.ckpt"], "inside the model directory"),
    "info-foreign-dir": (["info", "--model", "{foreign}", "--json", "{out}"], "not a semid model directory"),
    # Outputs that could never be written: found before the work, not after it
    "encode-vocab-is-a-directory": (["encode", "--model", "{model}", "--data", "{npy}", "--out", "{out}",
                                     "--vocab", "{foreign}"], "is a directory; name a file"),
    "evaluate-json-under-a-file": (["evaluate", "--model", "{model}", "--data", "{npy}", "--json", "{npy}/r.json"],
                                   "is a file, not a directory"),
    "evaluate-json-into-another-model": (["evaluate", "--model", "{model}", "--data", "{npy}",
                                          "--json", "{truncated}/meta.json"], "is inside the semid model directory"),
}


@pytest.fixture(scope="module")
def bad_files(work) -> dict[str, str]:
    """The inputs the bad cases name, keyed as in BAD_CASES' {placeholders}."""
    root = work["root"] / "bad"
    root.mkdir()
    x = np.load(work["npy"])[:300]
    files = {k: str(v) for k, v in work.items() if isinstance(v, Path)}
    nan, inf = x.copy(), x.copy()
    nan[250, 5] = np.nan  # in the third batch of 100: found while streaming, not up front
    inf[10, 0] = np.inf
    for name, array in {"nan": nan, "inf": inf, "dim100": x[:, :100], "empty": x[:0]}.items():
        np.save(root / f"{name}.npy", array)
        files[name] = str(root / f"{name}.npy")
    files["nan_parquet"] = str(root / "nan.parquet")
    _frame(nan, [f"i{i}" for i in range(len(x))]).write_parquet(files["nan_parquet"])
    files["dup"] = str(root / "dup.parquet")
    _frame(x, [f"i{i % 150}" for i in range(len(x))]).write_parquet(files["dup"])  # repeats across batches
    files["typo_config"] = str(root / "typo.toml")
    Path(files["typo_config"]).write_text(TINY_TOML.replace("codebook_size", "codebok_size"))
    for name in ("truncated", "no_meta"):
        shutil.copytree(work["model"], root / name)
        files[name] = str(root / name)
    weights = (root / "truncated" / "model.pt").read_bytes()
    (root / "truncated" / "model.pt").write_bytes(weights[: len(weights) // 2])
    (root / "no_meta" / "meta.json").unlink()
    (root / "foreign").mkdir()
    (root / "foreign" / "model.pt").write_bytes(b"not a model")
    files["foreign"] = str(root / "foreign")
    return files


def _argv(name: str, files: dict[str, str], folder: Path) -> tuple[list[str], Path]:
    """The case's arguments with its --out inside `folder` (an empty folder of its own)."""
    args, _ = BAD_CASES[name]
    out = folder / ("model" if args[0] == "train" else "result.json" if args[0] == "evaluate" else "ids.parquet")
    return [a.format(out=out, **files) for a in args], out


def _check_failure(name: str, returncode: int, stderr: str, out: Path) -> None:
    _, pattern = BAD_CASES[name]
    assert returncode != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"stderr is not one line:\n{stderr}"
    assert lines[0].startswith("semid ")
    assert pattern in lines[0]
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no partial or temporary files either


@pytest.mark.parametrize("name", list(BAD_CASES))
def test_bad_input_gives_one_line_error_and_no_output(bad_files, work, tmp_path, capsys, name):
    """Every case through `semid.cli.main` in this process (the code the command runs, minus the torch
    import that makes a subprocess cost seconds); test_bad_input_in_a_subprocess repeats a sample."""
    from semid.cli import main

    before = _digest(work["model"])
    argv, out = _argv(name, bad_files, tmp_path)
    returncode = main(argv)
    _check_failure(name, returncode, capsys.readouterr().err, out)
    assert _digest(work["model"]) == before  # a failed run never touches the model or its registry


SUBPROCESS_CASES = ["train-nan", "train-unknown-key", "encode-nan-parquet", "encode-duplicate-ids",
                    "encode-wrong-dimension", "encode-truncated-weights", "evaluate-nan"]


@pytest.fixture(scope="module")
def subprocess_runs(bad_files, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """A sample of the bad cases as real commands, run concurrently: name -> (result, its --out path)."""
    root = tmp_path_factory.mktemp("bad-subprocess")

    def run(name: str) -> tuple[subprocess.CompletedProcess, Path]:
        folder = root / name
        folder.mkdir()
        argv, out = _argv(name, bad_files, folder)
        return semid(*argv, cwd=folder), out

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(SUBPROCESS_CASES, pool.map(run, SUBPROCESS_CASES)))


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_in_a_subprocess(subprocess_runs, name):
    """The real command: exit status, and a stderr with nothing but the one line (no warnings, no bars)."""
    result, out = subprocess_runs[name]
    _check_failure(name, result.returncode, result.stderr, out)
    assert result.stdout == ""


def test_debug_flag_shows_the_traceback(work, tmp_path):
    from semid.cli import main
    from semid.tokenizer import ModelDirError

    with pytest.raises(ModelDirError, match="not found"):
        main(["--debug", "encode", "--model", str(tmp_path / "absent"), "--data", str(work["npy"]),
              "--out", str(tmp_path / "ids.parquet")])
    with pytest.raises(ModelDirError, match="not found"):  # after the command too
        main(["encode", "--model", str(tmp_path / "absent"), "--data", str(work["npy"]),
              "--out", str(tmp_path / "ids.parquet"), "--debug"])


@pytest.mark.parametrize("where", ["before", "after"])
def test_threads_sets_torchs_cpu_threads_before_the_command_runs(work, tmp_path, monkeypatch, where):
    import torch

    from semid.cli import main

    asked = []
    monkeypatch.setattr(torch, "set_num_threads", asked.append)
    command = ["encode", "--model", str(tmp_path / "absent"), "--data", str(work["npy"]),
               "--out", str(tmp_path / "ids.parquet")]
    argv = ["--threads", "1", *command] if where == "before" else [*command, "--threads", "1"]
    assert main(argv) == 1 and asked == [1]  # set, then the command failed on its missing model


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5"])
def test_threads_must_be_a_positive_whole_number(bad, capsys):
    from semid.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--threads", bad, "demo"])
    assert exit_info.value.code == 2 and "--threads: expected a whole number of at least 1" in capsys.readouterr().err


def test_train_names_the_cli_fix_when_a_prefix_overflows_and_refuses_certain_overflows_before_training(
        work, tmp_path, capsys):
    from semid.cli import main

    tiny = ["--set", "model.type=rqkmeans", "--set", "quantizer.codebook_size=[16, 4, 4]",
            "--set", "collisions.suffix_size=7", "--set", "train.progress=false"]  # 1,792 IDs for 1,682 items
    assert main(["train", "--data", str(work["npy"]), "--out", str(tmp_path / "m"), *tiny]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the SuffixOverflowWarning's line
    assert err.startswith("semid train: error: ") and "is full" in err and "--set collisions.suffix_size=" in err
    assert "tok.config" not in err and not (tmp_path / "m").exists()

    x = np.load(work["npy"])
    x[:60] = x[0]  # 60 identical items, and one prefix numbers 4 x 7 = 28
    np.save(tmp_path / "dup.npy", x)
    assert main(["train", "--data", str(tmp_path / "dup.npy"), "--out", str(tmp_path / "m"), *tiny]) == 1
    err = capsys.readouterr().err
    assert "60 items share one embedding exactly, more than the 28 IDs" in err and "trained" not in err


def test_resume_without_a_checkpoint_is_a_usage_error(tmp_path, capsys):
    from semid.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", "x.npy", "--out", str(tmp_path / "m"), "--resume"])
    assert exit_info.value.code == 2 and "--resume needs --checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--user-col", "--time-col"])
def test_interaction_columns_without_a_log_are_a_usage_error(flag, capsys):
    from semid.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--model", "m", "--data", "x.npy", flag, "when", "--sequences", "s.txt"])
    assert exit_info.value.code == 2 and "name columns of --interactions LOG" in capsys.readouterr().err


def test_warnings_print_as_one_line_and_leave_the_warning_display_alone(monkeypatch, capsys):
    import warnings

    import semid.cli

    def warns(args):
        warnings.warn(UserWarning("a crowded tuple\nwas remapped"))
        return 0

    monkeypatch.setattr(semid.cli, "cmd_evaluate", warns)
    display = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert semid.cli.main(["evaluate", "--model", "m", "--data", "d.npy"]) == 0
    assert capsys.readouterr().err == "semid evaluate: warning: a crowded tuple was remapped\n"
    assert warnings.showwarning is display


def test_the_files_the_command_ships_with_go_into_the_wheel():
    """`semid train` without --config and `semid demo` read these after `pip install` too: pyproject must map
    each into the package (a wheel without them once made `train` fall back to other defaults)."""
    import fnmatch

    from semid.cli import BUNDLED_SAMPLE, DEFAULT_CONFIG, DEMO_CONFIG
    from semid.config import tomllib

    setuptools = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]
    shipped = {Path(source): package for package, source in setuptools["package-dir"].items()}
    for path in (BUNDLED_SAMPLE, DEFAULT_CONFIG, DEMO_CONFIG):
        assert path.is_file(), path
        package = shipped[Path(path.parent.name)]
        assert package in setuptools["packages"]
        assert any(fnmatch.fnmatch(path.name, glob) for glob in setuptools["package-data"][package]), path


def test_an_interrupted_command_names_itself_and_the_checkpoint_it_left(tmp_path, monkeypatch, capsys):
    import semid.cli

    checkpoint = tmp_path / "train.ckpt"
    checkpoint.write_bytes(b"a checkpoint")

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(semid.cli, "cmd_train", interrupted)
    args = ["train", "--data", "x.npy", "--out", str(tmp_path / "m"), "--checkpoint", str(checkpoint)]
    assert semid.cli.main(args) == 130
    assert capsys.readouterr().err == f"\nsemid train: interrupted; the checkpoint {checkpoint} resumes it (--resume)\n"


def test_a_reader_that_leaves_the_pipe_is_no_error(monkeypatch, capsys):
    """`semid info --model M | head -1`: the closed pipe ends the command quietly, as it ends `cat`."""
    import semid.cli

    def printing_into_a_closed_pipe(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(semid.cli, "cmd_info", printing_into_a_closed_pipe)
    assert semid.cli.main(["info", "--model", "m"]) == 141
    assert capsys.readouterr().err == ""


def test_sigterm_unwinds_a_command_as_ctrl_c_does(tmp_path, monkeypatch, capsys):
    """A scheduler's SIGTERM (timeout, docker stop) reaches the command as an exception, so that what it was
    doing is undone or named; the handler it replaced is back afterwards."""
    import os
    import signal
    import time

    import semid.cli

    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        pytest.fail("SIGTERM did not interrupt the command")

    monkeypatch.setattr(semid.cli, "cmd_train", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert semid.cli.main(["train", "--data", "x.npy", "--out", str(tmp_path / "m")]) == 143
    assert capsys.readouterr().err == "\nsemid train: terminated\n"
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize("signum, code, word", [(2, 130, "interrupted"), (15, 143, "terminated")])
def test_a_signal_that_breaks_an_import_is_reported_as_the_interruption(tmp_path, monkeypatch, capsys, signum, code,
                                                                         word):
    """Ctrl-C while torch or numpy imports can leave a half-made module, whose later error names nothing the
    user did ("module 'numpy' has no attribute 'diff'"): the command reports the signal, not that error."""
    import os
    import signal

    import semid.cli

    def import_broken_by_a_signal(args):
        try:
            os.kill(os.getpid(), signum)
        except BaseException:  # swallowed, as a half-finished import's cleanup may
            pass
        raise AttributeError("module 'numpy' has no attribute 'diff'")

    monkeypatch.setattr(semid.cli, "cmd_train", import_broken_by_a_signal)
    before = signal.getsignal(signal.SIGINT)
    assert semid.cli.main(["train", "--data", "x.npy", "--out", str(tmp_path / "m")]) == code
    assert capsys.readouterr().err == f"\nsemid train: {word}\n"
    assert signal.getsignal(signal.SIGINT) == before

    def broken_without_a_signal(args):
        raise AttributeError("module 'numpy' has no attribute 'diff'")

    monkeypatch.setattr(semid.cli, "cmd_train", broken_without_a_signal)  # the next command's error is its own
    assert semid.cli.main(["train", "--data", "x.npy", "--out", str(tmp_path / "m")]) == 1
    assert "error: module 'numpy' has no attribute 'diff'" in capsys.readouterr().err


def test_a_parquet_without_ids_is_read_with_an_empty_id_col_as_a_npy_is(work, tmp_path, capsys):
    """An embedding-only parquet (what a quick export often is): `--id-col ''` knows its items by their
    embeddings and numbers them by row, as for a .npy of the same rows; without it, the error says so."""
    from semid.cli import main

    x = np.load(work["npy"])
    bare = tmp_path / "bare.parquet"
    pl.DataFrame({"embedding": pl.Series(x.tolist(), dtype=pl.List(pl.Float32))}).write_parquet(bare)
    model = tmp_path / "model"
    assert main(["train", "--config", str(work["config"]), "--data", str(bare), "--out", str(model)]) == 1
    assert "has no column 'item_id'; its columns are: embedding" in capsys.readouterr().err
    assert main(["train", "--config", str(work["config"]), "--data", str(bare), "--id-col", "", "--out",
                 str(model)]) == 0
    from_parquet, from_npy = tmp_path / "a.parquet", tmp_path / "b.parquet"
    assert main(["encode", "--model", str(model), "--data", str(bare), "--id-col", "", "--out", str(from_parquet)]) == 0
    assert main(["encode", "--model", str(model), "--data", str(work["npy"]), "--out", str(from_npy)]) == 0
    a, b = pl.read_parquet(from_parquet), pl.read_parquet(from_npy)
    assert a["item_id"].to_list() == list(range(len(x))) and a.equals(b)
    assert "warning" not in capsys.readouterr().err  # the registry is keyed by content, as these rows are
    assert main(["evaluate", "--model", str(model), "--data", str(bare), "--id-col", "", "--quiet"]) == 0
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", str(model), "--data", str(bare), "--id-col", "", "--interactions", "log.csv"])
    assert "--id-col '' names none" in capsys.readouterr().err


def test_a_signal_the_parent_ignores_stays_ignored(tmp_path, monkeypatch, capsys):
    """`semid train ... &` in a script starts with SIGINT ignored: the Ctrl-C is the script's, not the job's."""
    import os
    import signal

    import semid.cli

    def finishes_despite_ctrl_c(args):
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)
        return 0

    monkeypatch.setattr(semid.cli, "cmd_train", finishes_despite_ctrl_c)
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert semid.cli.main(["train", "--data", "x.npy", "--out", str(tmp_path / "m")]) == 0
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    assert "interrupted" not in capsys.readouterr().err


def test_ctrl_c_while_the_command_imports_ends_in_one_line_not_a_traceback(tmp_path):
    """The console script's target catches a Ctrl-C that lands before `main` sets its handlers (while its
    modules import, the first tenth of a second): one line and the shell's 130, as at any later moment."""
    script = """
import sys
from importlib.metadata import entry_points

class CtrlC:  # the Ctrl-C lands while semid.cli imports
    def find_spec(self, name, path=None, target=None):
        if name == "semid.cli":
            raise KeyboardInterrupt

sys.meta_path.insert(0, CtrlC())
(target,) = entry_points(group="console_scripts", name="semid")
sys.exit(target.load()())
"""
    # not in the source tree, whose build metadata (semid.egg-info) may be older than the installed package's
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert (run.returncode, run.stderr) == (130, "\nsemid: interrupted\n")


def test_version_is_the_installed_distributions(capsys):
    from importlib import metadata

    import semid
    from semid.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out == f"semid {metadata.version('semid')}\n" == f"semid {semid.__version__}\n"



def test_evaluate_draws_its_bar_on_a_terminal_whatever_the_model_trained_with(work, monkeypatch, capsys):
    """`semid evaluate` on a terminal shows the neighbour search's bar unless --quiet, also for a model saved
    with train.progress = false (the tiny config's), as `semid encode` does."""
    import io

    from semid.cli import main
    from semid.tokenizer import SemanticIdTokenizer

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert SemanticIdTokenizer.load(work["model"]).config.train.progress is False
    for quiet, shown in (([], True), (["--quiet"], False)):
        terminal = Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        assert main(["evaluate", "--model", str(work["model"]), "--data", str(work["npy"]), *quiet]) == 0
        assert ("neighbours: 100%" in terminal.getvalue()) is shown
    capsys.readouterr()
