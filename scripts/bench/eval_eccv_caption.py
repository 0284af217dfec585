#!/usr/bin/env python3
"""The peer of `cusa-pipe bench eval`: what a user of the reference code runs.

Similarities by a float32 numpy matrix product (multithreaded BLAS), each query's top-K by
`argpartition` + sort (K = the most positives of any query, at least 10: all the metrics need;
exact ties ordered as the fixtures order them, wrong items first), then the reference
implementation: `eccv_caption._metrics.compute_r_at_k` for R@1/5/10 against the ground truth and
`compute_eccv_metrics` for mAP@R / R-Precision / R@1 against the extended positives (the
functions `Metrics().compute_all_metrics` calls; its public entry point only takes COCO ids).

    python3 scripts/bench/eval_eccv_caption.py DIR   # DIR written by `cusa-pipe bench eval`

Prints one JSON object: seconds (the whole computation, loading excluded), peak RSS (MiB),
the metrics in percent, and the machine's floor: the best of three runs of the one product
`images @ captions.T` alone (`gemm_seconds`) with the BLAS that did it (`blas`, from
threadpoolctl when installed: library, kernel architecture, threads). `cusa-pipe bench eval`
runs this with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset, so OpenBLAS picks its own kernels.
"""
import json
import resource
import sys
import time
import warnings

import numpy as np

warnings.filterwarnings("ignore")
from eccv_caption._metrics import compute_eccv_metrics, compute_r_at_k  # noqa: E402

d = sys.argv[1]
meta = json.load(open(f"{d}/meta.json"))
ni, nc, dim = meta["images"], meta["captions"], meta["dim"]
images = np.fromfile(f"{d}/images.f32", dtype="<f4").reshape(ni, dim)
captions = np.fromfile(f"{d}/captions.f32", dtype="<f4").reshape(nc, dim)
image_of = np.fromfile(f"{d}/image_of.u32", dtype="<u4")
positives = json.load(open(f"{d}/positives.json"))

t0 = time.perf_counter()


def retrieved(queries, gallery, k, truth, positives):
    """Top-k gallery rows per query, twice: ordered for the ground truth and for the extended
    positives. Among exactly tied scores the wrong items come first (the tie rule of the
    fixtures and of cusa-pipe); rows without a tie in their top k (nearly all: the scores are
    exact integers spread over millions) share one list."""
    k = min(k, len(gallery))
    wide = min(k + 8, len(gallery))  # room for a tie group cut by the partition
    by_truth, by_positives = {}, {}
    for s in range(0, len(queries), 1000):
        sims = queries[s : s + 1000] @ gallery.T
        part = np.argpartition(-sims, wide - 1, axis=1)[:, :wide]
        scores = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")
        part = np.take_along_axis(part, order, axis=1)
        scores = np.take_along_axis(scores, order, axis=1)
        tied = (np.diff(scores, axis=1) == 0).any(axis=1)
        for r, row in enumerate(part.tolist()):
            q = s + r
            if not tied[r]:
                by_truth[q] = by_positives[q] = row[:k]
                continue
            row_scores = scores[r].tolist()
            for out, wanted in ((by_truth, truth[q]), (by_positives, positives[q])):
                wanted = set(wanted)
                ranked = sorted(zip(row, row_scores), key=lambda g: (-g[1], g[0] in wanted))
                out[q] = [g for g, _ in ranked[:k]]
    return by_truth, by_positives


truth_i2t = {i: [] for i in range(ni)}
for c, i in enumerate(image_of.tolist()):
    truth_i2t[i].append(c)
truth_t2i = {c: [int(i)] for c, i in enumerate(image_of.tolist())}
gts = {
    "i2t": {q: p for q, p in enumerate(positives["i2t"]) if p},
    "t2i": {q: p for q, p in enumerate(positives["t2i"]) if p},
}
k_i2t = max(10, max(len(p) for p in positives["i2t"]))
k_t2i = max(10, max(len(p) for p in positives["t2i"]))
truth = {"i2t": truth_i2t, "t2i": truth_t2i}
ret_truth, ret_positives = {}, {}
for direction, q, g, k in (("i2t", images, captions, k_i2t), ("t2i", captions, images, k_t2i)):
    ret_truth[direction], ret_positives[direction] = retrieved(
        q, g, k, truth[direction], positives[direction]
    )
out = {"recalls": {}, "extended": {}}
for direction in ("i2t", "t2i"):
    for k in (1, 5, 10):
        r = compute_r_at_k(ret_truth[direction], truth[direction], K=k)
        out["recalls"][f"{direction} R@{k}"] = 100.0 * float(r)
    m = compute_eccv_metrics(ret_positives[direction], gts[direction])
    out["extended"][direction] = {
        "mAP@R": 100.0 * float(m["eccv_map_at_r"]),
        "R-P": 100.0 * float(m["eccv_rprecision"]),
        "R@1": 100.0 * float(m["eccv_r1"]),
    }
out["seconds"] = time.perf_counter() - t0
out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

# The floor: one single-precision product of the same shape, nothing else.
product = np.empty((ni, nc), dtype=np.float32)
best = float("inf")
for _ in range(3):
    t = time.perf_counter()
    np.matmul(images, captions.T, out=product)
    best = min(best, time.perf_counter() - t)
out["gemm_seconds"] = best
try:
    from threadpoolctl import threadpool_info

    blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    out["blas"] = ", ".join(
        f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')} kernels, "
        f"{i.get('num_threads')} threads"
        for i in blas
    )
except ImportError:
    out["blas"] = "unknown (pip install threadpoolctl to name it)"
print(json.dumps(out))
