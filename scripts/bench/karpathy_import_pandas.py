#!/usr/bin/env python3
"""The peer of `cusa-pipe bench dataset`: a Karpathy split file into the same normal form with
pandas + pyarrow, as a researcher would write it: restval folded into train, captions cleaned
with the reference pre_caption, images.parquet and captions.parquet written (snappy).

    python3 karpathy_import_pandas.py dataset_coco.json OUT_DIR
"""
import json
import os
import re
import sys

import pandas as pd

# The reference cleaning, shared with the fixture script so both sides clean identically.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures"))
from pre_caption import pre_caption  # noqa: E402


def main() -> None:
    src, out = sys.argv[1], sys.argv[2]
    with open(src) as f:
        data = json.load(f)
    images, captions = [], []
    for img in data["images"]:
        image_id = str(img.get("cocoid", img.get("imgid")))
        split = "train" if img["split"] == "restval" else img["split"]
        path = f"{img['filepath']}/{img['filename']}" if img.get("filepath") else img["filename"]
        images.append((image_id, path, split))
        for s in img["sentences"]:
            captions.append((str(s["sentid"]), image_id, split, s["raw"]))
    im = pd.DataFrame(images, columns=["image_id", "path", "split"])
    if im.image_id.duplicated().any():
        raise SystemExit("duplicate image ids")
    cap = pd.DataFrame(captions, columns=["caption_id", "image_id", "split", "text"])
    if cap.caption_id.duplicated().any():
        raise SystemExit("duplicate caption ids")
    cap["text_clean"] = cap.text.map(lambda t: pre_caption(t, 64))
    os.makedirs(out, exist_ok=True)
    im.to_parquet(os.path.join(out, "images.parquet"), engine="pyarrow", compression="snappy", index=False)
    cap.to_parquet(os.path.join(out, "captions.parquet"), engine="pyarrow", compression="snappy", index=False)


if __name__ == "__main__":
    main()
