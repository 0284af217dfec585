#!/usr/bin/env python3
"""Statistics of an extended-positives map (query id -> list of positive ids).

Used by the quickstart pipeline on the ECCV Caption maps for the COCO 5K test split: how many
positives each query has once false negatives are counted, compared with the original
annotation (one image per caption, ~5 captions per image). Standard library only.
"""
import argparse
import json
import statistics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("positives", help="JSON map: query id -> positive ids (extended)")
    ap.add_argument("--original", help="JSON map with the original positives, for comparison")
    ap.add_argument("--query", required=True, choices=["image", "caption"])
    ap.add_argument("--top", type=int, default=10, help="how many queries with most positives to list")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    with open(args.positives) as f:
        extended = json.load(f)
    if not extended:
        raise SystemExit(f"{args.positives}: no queries")
    counts = sorted(len(v) for v in extended.values())
    stats = {
        "query": args.query,
        "queries": len(extended),
        "positives": sum(counts),
        "min": counts[0],
        "median": statistics.median(counts),
        "mean": round(statistics.fmean(counts), 3),
        "max": counts[-1],
        "most_positives": [
            {"query_id": q, "positives": len(v)}
            for q, v in sorted(extended.items(), key=lambda kv: (-len(kv[1]), kv[0]))[: args.top]
        ],
    }
    if args.original:
        with open(args.original) as f:
            original = json.load(f)
        shared = [q for q in extended if q in original]
        if not shared:
            raise SystemExit("no query id is in both maps: are they the same split and direction?")
        orig = [len(original[q]) for q in shared]
        ext = [len(extended[q]) for q in shared]
        stats["original_mean"] = round(statistics.fmean(orig), 3)
        stats["extended_over_original"] = round(sum(ext) / sum(orig), 3)
    with open(args.out, "w") as f:
        json.dump(stats, f, indent=2, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
