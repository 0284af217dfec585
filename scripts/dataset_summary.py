#!/usr/bin/env python3
"""Markdown summary of a dataset stage's report.json (standard library only)."""
import json
import sys


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: dataset_summary.py REPORT.json")
    with open(sys.argv[1]) as f:
        r = json.load(f)
    print(f"# Dataset `{r['format']}`\n")
    print("| split | images | captions | positives per caption (mean / median / max) | captions with extended positives |")
    print("|---|---|---|---|---|")
    stats = r.get("positives_per_caption", {})
    for split, c in r["splits"].items():
        p = stats.get(split)
        pos = f"{p['mean']} / {p['median']} / {p['max']}" if p else "-"
        ext = f"{p['with_extended'] * 100:.1f} %" if p else "-"
        print(f"| {split} | {c['images']} | {c['captions']} | {pos} | {ext} |")
    for d in r["dropped"]:
        print(f"\ndropped {d['count']} × {d['reason']} (first: {', '.join(d['first'])})")


if __name__ == "__main__":
    main()
