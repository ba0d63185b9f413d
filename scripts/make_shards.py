"""Turn an imagefolder (metadata.jsonl / metadata.csv, or a .txt caption beside each image) into shards that
several processes or machines can read: webdataset tars (default) or parquet files.

    python scripts/make_shards.py --folder data/photos --out data/photos-shards --per-shard 1000
    python scripts/make_shards.py --folder data/photos --out data/photos-parquet --format parquet

Train on them with data.dataset=data/photos-shards (a folder of .tar or .parquet files), or a glob or fsspec
URL (hf://datasets/user/name/*.tar, s3://bucket/shards/*.tar). Images are copied byte for byte, in folder
order, so the shards train to the same weights as the folder and share its latent cache.
"""

import argparse

from ldm.cli import run_script


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", required=True, help="the imagefolder to convert")
    p.add_argument("--out", required=True, help="an empty (or new) folder for the shards")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--format", choices=["webdataset", "parquet"], default="webdataset")
    p.add_argument("--caption-column", default="text", help="the metadata file's caption column (default text)")
    a = p.parse_args()
    # imported after parsing, so that --help answers at once
    from ldm.data.shards import write_shards
    report = write_shards(a.folder, a.out, a.per_shard, a.format, a.caption_column)
    print(f"wrote {report.samples} samples in {len(report.shards)} {a.format} shard(s) to {a.out}")
    for name, why in list(report.skipped.items())[:10]:
        print(f"  not written: {why}")
    if len(report.skipped) > 10:
        print(f"  … and {len(report.skipped) - 10} more (all in {a.out}/shards.json)")


if __name__ == "__main__":
    run_script(main)
