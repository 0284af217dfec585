#!/usr/bin/env python3
"""Markdown summary of the per-direction statistics written by positive_stats.py."""
import json
import sys


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: summarize.py STATS.json [STATS.json ...]")
    rows = []
    for path in sys.argv[1:]:
        with open(path) as f:
            rows.append(json.load(f))
    print("# ECCV Caption extended positives (COCO 5K test split)\n")
    print("| query | queries | positives | min | median | mean | max | × original |")
    print("|---|---|---|---|---|---|---|---|")
    for s in rows:
        ratio = s.get("extended_over_original", "")
        print(f"| {s['query']} | {s['queries']} | {s['positives']} | {s['min']} | {s['median']} | {s['mean']} | {s['max']} | {ratio} |")


if __name__ == "__main__":
    main()
