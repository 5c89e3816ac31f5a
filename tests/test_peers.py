"""Tests of the benchmark's peer tokenizers and helpers (scripts/peers.py, scripts/bench_common.py,
scripts/bench_quality.py). Skipped where the optional `bench` extra (faiss) is not installed."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")
# One thread: FAISS's OpenMP workers spin-wait, which is slow on a small, shared machine.
faiss.omp_set_num_threads(1)

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_common  # noqa: E402
import peers  # noqa: E402


def _codeword_data(levels: int, k: int, dim: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Items that are exact sums of one codeword per level, with level scales 1, 1/8, 1/64, ... so that
    greedy residual quantization can recover every code. Every code tuple occurs equally often, so a
    level's cluster means carry the deeper levels only as a constant shift that the next level absorbs.
    Returns (x (n, d), codes (n, L), books (L, k, d)); n must be a multiple of k**levels."""
    rng = np.random.default_rng(seed)
    books = np.stack([rng.normal(size=(k, dim)) * 8.0 ** -level for level in range(levels)]).astype(np.float32)
    grid = np.stack(np.meshgrid(*[np.arange(k)] * levels, indexing="ij"), axis=-1).reshape(-1, levels)
    codes = rng.permutation(np.tile(grid, (n // len(grid), 1)))  # (n, l)
    x = sum(books[level][codes[:, level]] for level in range(levels)).astype(np.float32)
    return x, codes, books


def _fvu(x: np.ndarray, x_hat: np.ndarray) -> float:
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


@pytest.mark.parametrize("nbits", [2, 3, 4, 8])
def test_unpack_codes_matches_faiss_bit_layout(nbits: int) -> None:
    """Unpacked codes, looked up in the trained codebooks, give exactly FAISS's own decode."""
    levels, dim = 3, 6
    x = np.random.default_rng(0).normal(size=(600, dim)).astype(np.float32)
    rq = faiss.ResidualQuantizer(dim, levels, nbits)
    rq.max_beam_size = 1
    rq.train(x)
    packed = rq.compute_codes(x)
    codes = peers.unpack_codes(packed, levels, nbits)
    assert codes.shape == (600, levels) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < 1 << nbits
    books = faiss.vector_to_array(rq.codebooks).reshape(levels, 1 << nbits, dim)
    manual = sum(books[level][codes[:, level]] for level in range(levels))
    np.testing.assert_allclose(manual, rq.decode(packed), atol=1e-5)


def test_unpack_codes_hand_packed() -> None:
    """Bits are read least significant first: codes (1, 2, 3) with 4 bits pack into bytes 0x21, 0x03."""
    packed = np.array([[0x21, 0x03]], dtype=np.uint8)
    np.testing.assert_array_equal(peers.unpack_codes(packed, 3, 4), [[1, 2, 3]])


def test_faiss_rq_recovers_planted_codes() -> None:
    """On data built as sums of well-separated codewords, the FAISS quantizer reconstructs almost
    exactly and groups items at the first level exactly as the planted codes do."""
    x, planted, _ = _codeword_data(levels=2, k=4, dim=8, n=400, seed=1)
    system = peers.FaissResidualQuantizer().fit(x, levels=2, codebook_size=4, seed=0)
    codes = system.encode(x)
    assert codes.shape == (400, 2) and codes.dtype == np.int64
    assert _fvu(x, system.reconstruct(x)) < 1e-3
    # Same grouping up to a relabelling: each planted code maps to exactly one found code.
    pairs = set(zip(planted[:, 0].tolist(), codes[:, 0].tolist()))
    assert len(pairs) == 4 and len(set(codes[:, 0].tolist())) == 4


def test_residual_kmeans_is_greedy_nearest_codeword() -> None:
    """Each level's code is the nearest centroid to what the earlier levels left (checked with semid's
    own distance code), and the reconstruction is the sum of the chosen centroids."""
    import torch

    from semid.distance import nearest_code

    x = np.random.default_rng(2).normal(size=(500, 5)).astype(np.float32)
    system = peers.ResidualKMeans(niter=5).fit(x, levels=3, codebook_size=8, seed=0)
    codes = system.encode(x)
    residual = x.copy()
    for level, centroids in enumerate(system._centroids):
        expected, _ = nearest_code(torch.from_numpy(residual), torch.from_numpy(centroids), "l2")
        np.testing.assert_array_equal(codes[:, level], expected.numpy())
        residual -= centroids[codes[:, level]]
    np.testing.assert_allclose(system.reconstruct(x), x - residual, atol=1e-5)


def test_more_levels_never_reconstruct_worse() -> None:
    """Each residual level is fitted to what the previous ones left, so fvu falls with depth."""
    x = np.random.default_rng(3).normal(size=(800, 12)).astype(np.float32)
    fvus = [_fvu(x, peers.ResidualKMeans(niter=10).fit(x, levels, 16, seed=0).reconstruct(x)) for levels in (1, 2, 3)]
    assert fvus[0] > fvus[1] > fvus[2]


def test_faiss_rq_rejects_non_power_of_two() -> None:
    with pytest.raises(ValueError, match="power-of-two"):
        peers.FaissResidualQuantizer().fit(np.zeros((50, 4), np.float32), levels=2, codebook_size=12, seed=0)


def test_bad_input_and_unfitted_use_raise() -> None:
    with pytest.raises(ValueError, match="2-D"):
        peers.as_matrix(np.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        peers.as_matrix(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="not fitted"):
        peers.ResidualKMeans().encode(np.zeros((3, 2), np.float32))


@pytest.fixture
def one_torch_thread():
    """Small models train far faster on one thread than on several contended ones."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_vq_pytorch_autoencoder_trains(one_torch_thread) -> None:
    """A short run learns: the reconstruction explains part of the variance and codes are in range."""
    pytest.importorskip("vector_quantize_pytorch")
    x = np.random.default_rng(4).normal(size=(512, 16)).astype(np.float32)
    x[:, :4] *= 5.0  # a few dominant directions the autoencoder can learn quickly
    system = peers.VQPytorchRVQ(steps=150, batch_size=256, hidden=(32,), latent_dim=8)
    system.fit(x, levels=2, codebook_size=16, seed=0)
    codes = system.encode(x)
    assert codes.shape == (512, 2) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < 16
    x_hat = system.reconstruct(x)
    assert x_hat.shape == x.shape and np.isfinite(x_hat).all()
    assert _fvu(x, x_hat) < 0.9
    np.testing.assert_array_equal(system.encode(x), codes)  # eval mode: encoding is deterministic


def test_best_of_returns_the_minimum() -> None:
    calls = iter([0.0, 0.03, 0.01, 0.02])  # warm-up, then three timed calls

    def fn() -> None:
        import time

        time.sleep(next(calls))

    assert 0.005 < bench_common.best_of(fn, repeats=3, warmup=1) < 0.02


def test_write_json_atomic_converts_numpy(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "r.json"
    bench_common.write_json_atomic(path, {"a": np.float32(0.5), "b": np.arange(3), "c": (np.int64(2),)})
    assert json.loads(path.read_text()) == {"a": 0.5, "b": [0, 1, 2], "c": [2]}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary file left behind


def test_a_set_is_a_shared_name_or_any_npy_path(tmp_path: Path) -> None:
    """Every benchmark takes an item set of one's own by path, its sequences found beside it."""
    own = tmp_path / "own"
    own.mkdir()
    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    np.save(own / "catalogue.npy", x)
    (own / "catalogue_sequences.txt").write_text("u1\t0 1\n")
    elsewhere = tmp_path / "shared"  # the --data-dir, which a path does not need
    got = bench_common.load_embeddings(str(own / "catalogue.npy"), elsewhere)
    assert got.dtype == np.float32 and np.array_equal(got, x)
    assert bench_common.sequences_path(str(own / "catalogue.npy"), elsewhere) == own / "catalogue_sequences.txt"
    assert bench_common.sequences_path("catalogue", own) == own / "catalogue_sequences.txt"  # by name too
    assert bench_common.sequences_path("catalogue", elsewhere) is None
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        bench_common.load_embeddings(str(own / "missing.npy"), elsewhere)


def test_bench_quality_end_to_end(tmp_path: Path) -> None:
    """The benchmark runs the FAISS peers on a small set, writes JSON, plot and markdown, and merges."""
    pytest.importorskip("matplotlib")
    bench_quality = pytest.importorskip("bench_quality")
    pytest.importorskip("semid.metrics")
    rng = np.random.default_rng(5)
    toy = rng.normal(size=(300, 8)).astype(np.float32)
    toy[[1, 2]] = toy[0]  # three items with one embedding: collisions cannot go below 2 / 300
    np.save(tmp_path / "toy.npy", toy)
    (tmp_path / "toy_sequences.txt").write_text("u1\t0 1 2 3\nu2\t5 4\n")
    out, plot, md = tmp_path / "q.json", tmp_path / "q.png", tmp_path / "R.md"
    common = ["--data", "toy", "--data-dir", str(tmp_path), "--levels", "2", "--codebook-size", "8",
              "--out", str(out), "--plot", str(plot), "--markdown", str(md)]
    assert bench_quality.main([*common, "--systems", "faiss-rq"]) == 0
    assert bench_quality.main([*common, "--systems", "faiss-rkmeans"]) == 0
    assert bench_quality.main([*common, "--systems", "semid-rqkmeans", "--device", "cpu"]) == 0
    rows = json.loads(out.read_text())["results"]
    assert sorted(r["system"] for r in rows) == ["faiss-rkmeans", "faiss-rq", "semid-rqkmeans"]
    assert [r["precision"] for r in rows if r["system"] == "semid-rqkmeans"] == ["fp32"]  # no MLP, nothing cast
    for r in rows:
        assert 0.0 < r["fvu"] < 1.0 and len(r["entropy_bits"]) == 2 and "sequence_prefix_agreement" in r
    assert plot.stat().st_size > 0
    text = md.read_text()
    assert all(name in text for name in ("faiss-rq", "faiss-rkmeans", "semid-rqkmeans", "## toy"))
    assert "0.67% of items repeat another's embedding" in text
    assert all(r["duplicate_rate"] == pytest.approx(2 / 300) and r["collision_rate"] >= 2 / 300 for r in rows)


def test_bench_quality_rejects_unknown_set(tmp_path: Path) -> None:
    bench_quality = pytest.importorskip("bench_quality")
    with pytest.raises(SystemExit):
        bench_quality.parse_args(["--data", "nope", "--data-dir", str(tmp_path)])


def test_bench_quality_records_semid_failures_and_raises_peer_ones(tmp_path: Path, monkeypatch) -> None:
    """A failing semid configuration is kept as a reported failure while the run goes on; a failing
    peer is a benchmark bug and stops the run."""
    pytest.importorskip("matplotlib")
    bench_quality = pytest.importorskip("bench_quality")
    pytest.importorskip("semid.metrics")
    np.save(tmp_path / "toy.npy", np.random.default_rng(6).normal(size=(200, 6)).astype(np.float32))
    config = tmp_path / "c.toml"
    config.write_text("")
    out, md = tmp_path / "q.json", tmp_path / "R.md"
    argv = ["--data", "toy", "--data-dir", str(tmp_path), "--levels", "2", "--codebook-size", "4",
            "--out", str(out), "--plot", str(tmp_path / "q.png"), "--markdown", str(md),
            "--semid-config", str(config), "--device", "cpu", "--systems", "semid-rqkmeans", "faiss-rkmeans"]

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(bench_quality.SemidSystem, "fit", broken)
    assert bench_quality.main(argv) == 0
    saved = json.loads(out.read_text())
    assert [r["system"] for r in saved["results"]] == ["faiss-rkmeans"]
    assert saved["failures"] == [{"system": "semid-rqkmeans", "data": "toy", "steps": None, "error": "RuntimeError: boom"}]
    assert "## Failures" in md.read_text()

    monkeypatch.setattr(peers.ResidualKMeans, "fit", broken)
    with pytest.raises(RuntimeError, match="boom"):
        bench_quality.main(argv)


def test_plot_defaults_to_beside_the_json(tmp_path: Path) -> None:
    """A run to a scratch --out draws its plot beside it, never over the committed bench/quality.png."""
    bench_quality = pytest.importorskip("bench_quality")
    args = bench_quality.parse_args(["--data", "beauty", "--out", str(tmp_path / "scratch.json")])
    assert args.plot == tmp_path / "scratch.png"
    chosen = bench_quality.parse_args(["--data", "beauty", "--out", str(tmp_path / "a.json"), "--plot", "p.png"])
    assert chosen.plot == Path("p.png")


def test_parse_override_reads_toml_values() -> None:
    bench_quality = pytest.importorskip("bench_quality")
    assert bench_quality.parse_override("train.batch_size=1024") == ("train.batch_size", 1024)
    assert bench_quality.parse_override("train.lr=3e-3") == ("train.lr", 0.003)
    assert bench_quality.parse_override("quantizer.distance=cosine") == ("quantizer.distance", "cosine")
    assert bench_quality.parse_override("quantizer.codebook_size=[256, 128]") == ("quantizer.codebook_size", [256, 128])
    with pytest.raises(ValueError, match="SECTION.KEY=VALUE"):
        bench_quality.parse_override("steps=5")

def test_holdout_split_is_seeded_disjoint_and_complete() -> None:
    bench_quality = pytest.importorskip("bench_quality")
    fit, held = bench_quality.holdout_split(100, 0.1, seed=3)
    assert len(held) == 10 and len(fit) == 90
    assert sorted(np.concatenate([fit, held]).tolist()) == list(range(100))
    again = bench_quality.holdout_split(100, 0.1, seed=3)
    assert np.array_equal(fit, again[0]) and np.array_equal(held, again[1])
    assert len(bench_quality.holdout_split(100, 0.0, seed=3)[1]) == 0


def test_heldout_fvu_scores_rows_the_system_never_saw(tmp_path: Path) -> None:
    """A system fitted on 80% of a clustered set: held-out fvu is scored on the other 20% only, and the
    other metrics describe the fitted rows (n_items = 80%)."""
    bench_quality = pytest.importorskip("bench_quality")
    pytest.importorskip("semid.metrics")
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(16, 8)).astype(np.float32)
    x = (centres[rng.integers(0, 16, 500)] + 0.05 * rng.normal(size=(500, 8))).astype(np.float32)
    row = bench_quality.measure(peers.FaissResidualQuantizer(), x, 2, 16, seed=0, sequences=None, holdout=0.2)
    assert row["n_items"] == 400 and row["holdout"] == 0.2
    _, held = bench_quality.holdout_split(500, 0.2, seed=0)
    x_held = x[held]
    # The held-out rows are near the same centres, so a quantizer that learned the centres reconstructs
    # them well but not perfectly: the figure is a real score of unseen rows, not the training fvu.
    assert 0.0 < row["heldout_fvu"] < 0.2
    system = peers.FaissResidualQuantizer().fit(x[np.setdiff1d(np.arange(500), held)], 2, 16, 0)
    expected = ((x_held - system.reconstruct(x_held)) ** 2).sum() / ((x_held - x_held.mean(0)) ** 2).sum()
    assert row["heldout_fvu"] == pytest.approx(float(expected), rel=1e-5)
    # The held-out items' IDs: neighbours among all 500 rows, scored with the codes of every row.
    fit = np.setdiff1d(np.arange(500), held)
    codes = np.empty((500, 2), dtype=np.int64)
    codes[fit], codes[held] = system.encode(x[fit]), system.encode(x_held)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    near = np.argsort(-sims[held], axis=1)[:, :10]  # (held, 10)
    share = (codes[near][:, :, 0] == codes[held][:, None, 0]).mean()
    assert row["heldout_prefix_agreement"][0] == pytest.approx(float(share), abs=0.01)
    taken = {tuple(c) for c in codes[fit].tolist()}
    assert row["heldout_taken"] == pytest.approx(np.mean([tuple(c) in taken for c in codes[held].tolist()]))
    assert 0.5 < row["heldout_taken"] <= 1.0  # 16 x 16 tuples for 16 tight clusters: most new rows land on taken ones


def test_semid_rqkmeans_is_benchmarked_without_prefix_centres(one_torch_thread) -> None:
    """Like for like with FAISS: the benchmark's residual k-means has no centre table; the RQ-VAE keeps its."""
    bench_quality = pytest.importorskip("bench_quality")
    config = SCRIPTS.parent / "configs" / "default.toml"
    x = np.random.default_rng(2).normal(size=(300, 8)).astype(np.float32)
    kmeans = bench_quality.make_system("semid-rqkmeans", None, "cpu", config).fit(x, 2, 8, 0)
    assert kmeans.overrides["quantizer.prefix_centres"] is False
    assert not kmeans._tok.model.quantizer.has_centres
    quick = {"train.min_epochs": 0, "train.decoder_refit_steps": 0}  # 5 steps, not 300 passes and a refit
    rqvae = bench_quality.make_system("semid-rqvae-rotation", 5, "cpu", config, quick).fit(x, 2, 8, 0)
    assert rqvae._tok.model.quantizer.has_centres


def test_semid_rows_record_the_training_history(one_torch_thread) -> None:
    """A semid row carries its training evaluations, so a benchmark shows whether more steps would pay."""
    bench_quality = pytest.importorskip("bench_quality")
    config = SCRIPTS.parent / "configs" / "default.toml"
    x = np.random.default_rng(3).normal(size=(300, 8)).astype(np.float32)
    system = bench_quality.make_system("semid-rqvae-rotation", 20, "cpu", config,
                                       {"train.eval_every": 10, "train.min_epochs": 0})
    row = bench_quality.measure(system, x, 2, 8, seed=0, sequences=None)
    assert [h["step"] for h in row["history"]] == [10, 20]
    assert all(0.0 < h["fvu"] and 0.0 <= h["collision_rate"] <= 1.0 and h["loss"] > 0 for h in row["history"])
    assert row["history"] == system.history
    raised = bench_quality.make_system("semid-rqvae-rotation", 2, "cpu", config, {
        "train.eval_every": 0, "train.min_epochs": 20, "train.decoder_refit_steps": 0})
    bench_quality.measure(raised, x, 2, 8, seed=0, sequences=None)
    assert raised.steps_run == 20  # the steps that ran (train.min_epochs raised them), not the floor of 2
    assert "history" not in bench_quality.measure(peers.FaissResidualQuantizer(), x, 2, 8, seed=0, sequences=None)
