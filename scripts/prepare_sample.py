"""Regenerate the bundled sample in data/ from the shared real-data folder.

The sample is goodbooks-10k (CC BY-SA 4.0, the one shared set that may be redistributed). It ships as a
single parquet with ids, embeddings and the embedded text, rather than the shared .npy plus
.items.parquet pair, so that the demo reads one file with ids and the embeddings are stored once.
The embeddings stay float32 and bit-identical to the shared .npy; the script checks that after writing.

Usage: python scripts/prepare_sample.py [--shared ../shared/data] [--out data]
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import polars as pl

from semid.atomic import atomic_write
from semid.sources import read_items

ROOT = Path(__file__).resolve().parents[1]
# Small row groups let the streaming reader show bounded memory on the sample; the size cost is tiny.
ROW_GROUP_SIZE = 2048


def build_sample(shared: Path, out: Path) -> Path:
    """Write out/goodbooks.parquet (item_id, embedding list[f32], text) and out/LICENSE; return the parquet."""
    emb = np.load(shared / "goodbooks.npy")  # (n, d) float32
    items = pl.read_parquet(shared / "goodbooks.items.parquet", columns=["item_id", "text"])
    if len(items) != len(emb):
        raise SystemExit(f"row counts differ: {len(emb)} embeddings, {len(items)} items")
    df = pl.DataFrame(
        {
            "item_id": items["item_id"].cast(pl.String),
            "embedding": pl.Series(emb).cast(pl.List(pl.Float32)),
            "text": items["text"],
        }
    )
    target = out / "goodbooks.parquet"
    atomic_write(target, lambda tmp: df.write_parquet(tmp, row_group_size=ROW_GROUP_SIZE))
    atomic_write(out / "LICENSE", lambda tmp: shutil.copyfile(shared / "raw" / "goodbooks" / "LICENSE", tmp))

    back = read_items(target)
    if not (np.array_equal(back.embeddings, emb) and np.array_equal(back.ids, items["item_id"].to_numpy())):
        raise SystemExit(f"{target} does not read back equal to the shared data")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data", help="shared data folder")
    parser.add_argument("--out", type=Path, default=ROOT / "data", help="where the sample goes")
    args = parser.parse_args()
    target = build_sample(args.shared, args.out)
    print(f"wrote {target} ({target.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
