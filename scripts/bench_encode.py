"""Batch tokenization at scale: `semid encode` throughput and peak memory on million-item catalogues.

    python scripts/bench_encode.py [--sizes 1000000 4000000] [--workdir DIR] [--keep]
    python scripts/bench_encode.py --sizes 1000000 2000000 --workdir DIR --reuse --check-items 0 --out OUT
        # before/after a change: the second run reuses the first one's model and catalogues

What it shows, and why it is built this way:
- Catalogues are real item embeddings (Beauty rows drawn with replacement plus a little seeded Gaussian
  noise, so every row is distinct), written as parquet (`item_id` str, `embedding` list[f32], row groups of
  65,536) and as .npy, chunk by chunk, so that making a 4M x 384 file never holds it in memory here.
- `semid encode` runs as a child process, exactly as a user runs it. Its peak RSS comes from the kernel
  (through GNU time), its peak anonymous memory from polling /proc. The two differ for
  .npy input: pages of a memory-mapped file count toward RSS while they are mapped, but they are clean page
  cache that the kernel drops at will, so the anonymous peak is the memory the process really needs.
- Memory must stay bounded as N grows: embeddings are streamed a batch at a time and only codes and ids are
  held, so the growth of the peak from the smallest to the largest catalogue is reported per added item
  and set against the 4 * D bytes per item that holding the embeddings would cost.
- Codes must not depend on the batch size: one file encoded with two batch sizes gives identical outputs.
Every run gets a fresh copy of the trained model, because `semid encode` records new items in the model's
registry and a later run must not find an earlier run's items there.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import default_data_dir, load_embeddings, write_json_atomic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROW_GROUP = 65536
CHUNK = 262144  # rows generated and written at a time: bounds this script's own memory
MB = 2**20


# ---- catalogues -----------------------------------------------------------------------------------
def write_catalogue(base: np.ndarray, n: int, seed: int, noise: float, parquet: Path, npy: Path | None,
                    parts_out: Path | None = None) -> tuple[float, float]:
    """Write n rows resampled from `base` plus N(0, (noise * std)^2) noise; return (seconds, mean cosine).

    The .npy (when asked) holds the same rows in the same order as the parquet; row i has item_id
    f"item{i:09d}". The noise is relative to the data's own element standard deviation, so it means the same
    for any embedding model; the mean cosine between a written row and the real row it was drawn from
    (first chunk) says how far it moves items. Parquet chunks go to part files that one streaming sink
    joins into the target with fixed row groups, so neither file is ever held in memory whole; with
    `parts_out` the part files stay there too, as a warehouse export of the same rows in CHUNK-row parts.
    """
    started = time.perf_counter()
    rng = np.random.default_rng([seed, n])
    sigma = np.float32(noise * base.std())
    d = base.shape[1]
    parts_dir = Path(tempfile.mkdtemp(prefix=".parts-", dir=parquet.parent))
    mm = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float32, shape=(n, d)) if npy else None
    try:
        parts = []
        for start in range(0, n, CHUNK):
            b = min(CHUNK, n - start)
            source = base[rng.integers(0, len(base), b)]  # (b, d)
            rows = source + sigma * rng.standard_normal((b, d), dtype=np.float32)
            if start == 0:
                cosine = float(np.mean(np.sum(rows * source, 1) / np.linalg.norm(rows, axis=1)
                                       / np.linalg.norm(source, axis=1)))
            if mm is not None:
                mm[start : start + b] = rows
            ids = pl.int_range(start, start + b, eager=True).cast(pl.String).str.zfill(9)
            frame = pl.DataFrame({"item_id": "item" + ids, "embedding": pl.Series(rows).cast(pl.List(pl.Float32))})
            parts.append(parts_dir / f"{len(parts):05d}.parquet")
            frame.write_parquet(parts[-1], row_group_size=ROW_GROUP)
        if mm is not None:
            mm.flush()
            del mm
        pl.scan_parquet(parts).sink_parquet(parquet, row_group_size=ROW_GROUP)
        if parts_out is not None:
            shutil.rmtree(parts_out, ignore_errors=True)
            parts_dir.rename(parts_out)
    finally:
        shutil.rmtree(parts_dir, ignore_errors=True)
    return time.perf_counter() - started, cosine


def train_model(x: np.ndarray, config: Path, steps: int, batch_size: int, suffix_size: int, out: Path) -> float:
    """Train and save a model on real data; seconds taken. Quality is beside the point here, speed is not.

    Catalogues resampled from a small set hold hundreds of near-copies of each real item, which land on
    one code tuple far more often than distinct items would; the suffix vocabulary is widened so that the
    default collision handling (suffix) can number them all.
    """
    from semid.tokenizer import SemanticIdTokenizer

    started = time.perf_counter()
    overrides = {"train.steps": steps, "train.min_epochs": 0, "train.eval_every": steps, "train.batch_size": batch_size,
                 "train.device": "cpu", "train.progress": False, "collisions.suffix_size": suffix_size}
    SemanticIdTokenizer.from_config(config, overrides=overrides).fit(x).save(out)
    return time.perf_counter() - started


# ---- one measured child ---------------------------------------------------------------------------
@dataclass
class EncodeRun:
    fmt: str
    n_items: int
    batch_size: int
    seconds: float
    items_per_second: float
    peak_rss_mb: float  # kernel high-water mark of the command's resident set (see run_child)
    peak_anon_mb: float | None  # polled peak of RssAnon: memory not backed by a file (None off Linux)
    input_mb: float
    output_mb: float
    max_group: int  # most items sharing one code tuple (the largest suffix + 1)
    load_1m: float  # host load average at the end of the run: other processes slow every figure down


def semid_command() -> list[str]:
    """The installed `semid` entry point next to this interpreter, else the module behind it."""
    exe = Path(sys.executable).with_name("semid")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "semid.cli"]


GNU_TIME = Path("/usr/bin/time")


def _status_kb(pid: int) -> dict[str, int]:
    """The kB fields of /proc/<pid>/status (VmHWM, RssAnon, ...); empty once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in fh) if v.strip().endswith("kB")}
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}


def _first_child(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def run_child(cmd: list[str], threads: int = 0, poll_s: float = 0.05) -> tuple[float, float, float | None]:
    """Run cmd to completion: (wall seconds, peak RSS MB, polled peak anonymous MB or None off Linux).

    Peak RSS is GNU time's %M, the kernel's maximum resident set of the command, when /usr/bin/time exists.
    It is not the wait4 rusage of a child forked from this script: Linux carries the high-water mark of
    the forked image across exec, so such a child reports at least this (large) script's RSS. Without GNU
    time it is the last VmHWM polled from /proc (it misses growth in the final poll interval only).
    threads > 0 caps the command's intra-op threads (OMP_NUM_THREADS, which torch reads at start-up).
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    with tempfile.TemporaryDirectory() as tmp:
        time_out = Path(tmp) / "maxrss"
        wrapped = [str(GNU_TIME), "-f", "%M", "-o", str(time_out), *cmd] if GNU_TIME.is_file() else cmd
        started = time.perf_counter()
        proc = subprocess.Popen(wrapped, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        target = proc.pid if wrapped is cmd else None  # the measured process: under time, its child
        peak_anon = peak_hwm = None
        while proc.poll() is None:
            target = target or _first_child(proc.pid)
            status = _status_kb(target) if target else {}
            if "RssAnon" in status:
                peak_anon = max(peak_anon or 0, status["RssAnon"])
                peak_hwm = max(peak_hwm or 0, status["VmHWM"])
            time.sleep(poll_s)
        wall = time.perf_counter() - started
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed with status {proc.returncode}: {err.strip() or out.strip()}")
        rss_kb = int(time_out.read_text().split()[-1]) if wrapped is not cmd else peak_hwm
    if rss_kb is None:
        raise RuntimeError("cannot measure peak memory here: neither /usr/bin/time nor /proc is available")
    return wall, rss_kb / 1024, None if peak_anon is None else peak_anon / 1024


def encode_run(model: Path, data: Path, out: Path, batch_size: int, n: int, fmt: str, threads: int) -> EncodeRun:
    """One `semid encode` on a fresh copy of the model (so runs never share a registry); threads 0: torch's default."""
    fresh = out.with_name(out.stem + ".model")
    shutil.rmtree(fresh, ignore_errors=True)
    shutil.copytree(model, fresh)
    cmd = [*semid_command(), "encode", "--model", str(fresh), "--data", str(data), "--out", str(out),
           "--batch-size", str(batch_size), "--quiet"]
    wall, rss, anon = run_child(cmd, threads)
    shutil.rmtree(fresh)
    max_group = pl.scan_parquet(out).select(pl.col("codes").list.get(-1).max()).collect().item() + 1
    return EncodeRun(fmt, n, batch_size, round(wall, 2), round(n / wall), round(rss, 1),
                     None if anon is None else round(anon, 1), round(_size(data) / MB, 1),
                     round(out.stat().st_size / MB, 1), max_group, round(os.getloadavg()[0], 2))


def _size(path: Path) -> int:
    """Bytes of a file, or of every file in a directory of parts."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def batch_size_check(model: Path, data: Path, n: int, batch_sizes: list[int], work: Path, threads: int) -> dict:
    """Encode one file with each batch size; the output files must be identical (ids, codes, semantic IDs)."""
    frames = []
    for bs in batch_sizes:
        out = work / f"check-bs{bs}.parquet"
        encode_run(model, data, out, bs, n, "parquet", threads)
        frames.append(pl.read_parquet(out))
        out.unlink()
    identical = all(f.equals(frames[0]) for f in frames[1:])
    return {"n_items": n, "batch_sizes": batch_sizes, "identical": identical,
            "distinct_ids": frames[0]["semantic_id"].n_unique()}


def row_group_reads(base: np.ndarray, n: int, seed: int, noise: float, work: Path) -> list[dict]:
    """Seconds to stream n items through `iter_item_batches`, by the file's row-group size and the batch size.

    Why: polars decodes a row group whole for any slice of it. semid reads each group once (the groups come from
    the file's footer, `semid/parquet_footer.py`), so these times should barely depend on the batch size; before
    that, batches smaller than a file's row groups decoded each group again and again."""
    from semid.sources import iter_item_batches

    source = work / "row-groups-source.parquet"
    write_catalogue(base, n, seed, noise, source, None)
    frame = pl.read_parquet(source)
    source.unlink()
    results = []
    for group in (n, 20_000):
        path = work / f"row-groups-{group}.parquet"
        frame.write_parquet(path, row_group_size=group)
        for batch in (65_536, 8_192):
            started = time.perf_counter()
            batches = sum(1 for _ in iter_item_batches(path, batch))
            results.append({"row_group_size": group, "batch_size": batch, "batches": batches,
                            "seconds": round(time.perf_counter() - started, 2)})
            print(f"  {n:,} items in row groups of {group:,}, batches of {batch:,}: {results[-1]['seconds']} s",
                  flush=True)
        path.unlink()
    return results


# ---- report ---------------------------------------------------------------------------------------
def memory_growth(runs: list[EncodeRun], dim: int) -> list[dict]:
    """Per format: how much the peak grows per item added, against the bytes per item of the embeddings."""
    result = []
    for fmt in sorted({r.fmt for r in runs}):
        rs = sorted((r for r in runs if r.fmt == fmt), key=lambda r: r.n_items)
        if len(rs) < 2:
            continue
        small, large = rs[0], rs[-1]
        added = large.n_items - small.n_items
        entry = {"format": fmt, "from_items": small.n_items, "to_items": large.n_items,
                 "items_ratio": round(large.n_items / small.n_items, 2),
                 "peak_rss_ratio": round(large.peak_rss_mb / small.peak_rss_mb, 2),
                 "rss_bytes_per_added_item": round((large.peak_rss_mb - small.peak_rss_mb) * MB / added),
                 "embedding_bytes_per_item": 4 * dim}
        if small.peak_anon_mb is not None and large.peak_anon_mb is not None:
            entry["anon_bytes_per_added_item"] = round((large.peak_anon_mb - small.peak_anon_mb) * MB / added)
        result.append(entry)
    return result


def print_table(runs: list[EncodeRun]) -> None:
    print(f"\n{'format':8} {'items':>10} {'batch':>7} {'seconds':>8} {'items/s':>9} {'peak RSS MB':>12} "
          f"{'peak anon MB':>13} {'input MB':>9} {'output MB':>10} {'max group':>10} {'load':>5}")
    for r in runs:
        anon = "-" if r.peak_anon_mb is None else f"{r.peak_anon_mb:,.0f}"
        print(f"{r.fmt:8} {r.n_items:>10,} {r.batch_size:>7,} {r.seconds:>8.1f} {r.items_per_second:>9,} "
              f"{r.peak_rss_mb:>12,.0f} {anon:>13} {r.input_mb:>9,.0f} {r.output_mb:>10,.1f} {r.max_group:>10,} {r.load_1m:>5.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000], help="catalogue sizes")
    parser.add_argument("--formats", nargs="+", choices=["parquet", "npy", "parts"], default=["parquet", "npy"],
                        help="parts: the parquet's rows as a directory of 262,144-row part files (a warehouse export)")
    parser.add_argument("--batch-size", type=int, default=65536, help="semid encode --batch-size for the scale runs")
    parser.add_argument("--check-items", type=int, default=100_000, help="rows of the batch-size invariance check")
    parser.add_argument("--check-batch-sizes", type=int, nargs="+", default=[4096, 65536])
    parser.add_argument("--data", default="beauty", help="shared set the catalogues are drawn from")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.toml")
    parser.add_argument("--steps", type=int, default=300, help="training steps (throughput does not need quality)")
    parser.add_argument("--train-batch-size", type=int, default=2048, help="training batch (small: a quick model)")
    parser.add_argument("--noise", type=float, default=0.5, help="noise std relative to the data's element std")
    parser.add_argument("--suffix-size", type=int, default=65536, help="collisions.suffix_size of the trained model")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for training and for each semid encode (0: torch's default, one per core)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="where catalogues go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files in --workdir")
    parser.add_argument("--reuse", action="store_true",
                        help="work in --workdir itself: reuse the model and catalogues found there (an earlier "
                             "--reuse run leaves them), so that runs before and after a change see the same files")
    parser.add_argument("--row-group-items", type=int, default=200_000,
                        help="items of the row-group read timing (0: skip it)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "encode.json")
    args = parser.parse_args()
    if min(args.sizes) < 1 or min(args.check_items, args.row_group_items, args.threads) < 0 or args.batch_size < 1:
        parser.error("sizes and --batch-size must be positive; --check-items, --row-group-items (0: skip) and "
                     "--threads not negative")
    if args.reuse and not args.workdir:
        parser.error("--reuse needs --workdir")
    if args.threads:
        torch.set_num_threads(args.threads)

    # A plain kill (SIGTERM) unwinds like Ctrl-C, so the `finally` below still removes the work files.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    base = load_embeddings(args.data, args.data_dir)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = args.workdir if args.reuse else Path(tempfile.mkdtemp(prefix="semid-bench-encode-", dir=args.workdir))
    keep = args.keep or args.reuse
    started = time.perf_counter()
    try:
        model = work / "model"
        train_s: float | None = None
        if args.reuse and model.is_dir():
            print(f"reusing the model in {model}", flush=True)
        else:
            train_s = train_model(base, args.config, args.steps, args.train_batch_size, args.suffix_size, model)
            print(f"trained {args.config.name} ({args.steps} steps) on {args.data} in {train_s:.1f} s", flush=True)

        check, cosine = None, None
        if args.check_items:
            check_file = work / "check.parquet"
            _, cosine = write_catalogue(base, args.check_items, args.seed, args.noise, check_file, None)
            check = batch_size_check(model, check_file, args.check_items, args.check_batch_sizes, work, args.threads)
            check_file.unlink()
            print(f"batch-size check on {args.check_items:,} items, batch sizes {args.check_batch_sizes}: "
                  f"{'identical' if check['identical'] else 'DIFFERENT'} outputs", flush=True)

        reads = row_group_reads(base, args.row_group_items, args.seed, args.noise, work) if args.row_group_items else None

        runs: list[EncodeRun] = []
        generation, parts_check = {}, {}
        for n in sorted(args.sizes):
            parquet, npy, parts = work / f"items-{n}.parquet", work / f"items-{n}.npy", work / f"items-{n}.parts"
            want_npy, want_parts = "npy" in args.formats, "parts" in args.formats
            if args.reuse and parquet.is_file() and (npy.is_file() or not want_npy) and (parts.is_dir() or not want_parts):
                print(f"reusing the {n:,}-item catalogue in {work}", flush=True)
            else:
                gen_s, gen_cosine = write_catalogue(base, n, args.seed, args.noise, parquet, npy if want_npy else None,
                                                    parts if want_parts else None)
                cosine = gen_cosine if cosine is None else cosine
                generation[n] = round(gen_s, 1)
                print(f"wrote {n:,} items in {gen_s:.1f} s", flush=True)
            for fmt in args.formats:
                data = {"parquet": parquet, "npy": npy, "parts": parts}[fmt]
                run = encode_run(model, data, work / f"ids-{fmt}-{n}.parquet", args.batch_size, n, fmt, args.threads)
                runs.append(run)
                print(f"  {fmt}: {run.items_per_second:,} items/s, peak RSS {run.peak_rss_mb:,.0f} MB", flush=True)
            if want_parts and "parquet" in args.formats:  # the same rows in parts or in one file: the same IDs
                same = pl.read_parquet(work / f"ids-parts-{n}.parquet").equals(pl.read_parquet(work / f"ids-parquet-{n}.parquet"))
                parts_check[n] = same
                print(f"  parts and one file give {'identical' if same else 'DIFFERENT'} outputs", flush=True)
            for fmt in args.formats:
                (work / f"ids-{fmt}-{n}.parquet").unlink()
            if not keep:
                parquet.unlink()
                npy.unlink(missing_ok=True)
                shutil.rmtree(parts, ignore_errors=True)
        print_table(runs)
        growth = memory_growth(runs, base.shape[1])
        for g in growth:
            print(f"{g['format']}: {g['items_ratio']}x items -> {g['peak_rss_ratio']}x peak RSS; "
                  f"{g['rss_bytes_per_added_item']} RSS bytes per added item"
                  + (f" ({g['anon_bytes_per_added_item']} anonymous)" if "anon_bytes_per_added_item" in g else "")
                  + f" vs {g['embedding_bytes_per_item']} bytes of embedding per item")
        write_json_atomic(args.out, {
            "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "encode_threads": args.threads or "torch default",
                     "python": platform.python_version(), "torch": torch.__version__, "polars": pl.__version__,
                     "peak_rss_source": "GNU time %M" if GNU_TIME.is_file() else "polled VmHWM"},
            "data": args.data, "noise": args.noise, "seed": args.seed, "suffix_size": args.suffix_size,
            "mean_cosine_to_source_row": None if cosine is None else round(cosine, 3), "config": str(args.config.relative_to(REPO))
            if args.config.is_relative_to(REPO) else str(args.config), "train_steps": args.steps, "train_batch_size": args.train_batch_size,
            "train_seconds": None if train_s is None else round(train_s, 1), "row_group_size": ROW_GROUP, "generation_seconds": generation,
            "batch_size_check": check, "row_group_reads": reads, "runs": [asdict(r) for r in runs], "memory_growth": growth, "parts_identical_to_one_file": parts_check,
            "total_seconds": round(time.perf_counter() - started, 1),
        })
        print(f"\nwritten to {args.out} ({time.perf_counter() - started:.0f} s in all)")
    finally:
        if keep and args.workdir:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
