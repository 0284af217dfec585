#!/usr/bin/env python3
"""The quickstart ablation over seeds, with CSA's alpha and USA's beta chosen on validation.

1. alpha: `train_csa` for each value of --alphas (seed 0); the one with the best validation
   RSUM wins. beta: the same with `train_usa` and --betas. CUSA uses both winners.
2. For each seed: base, +CSA, +USA and +CUSA trained (`train_*.with.seed`) and measured on the
   test split (`eval_*`). The test split is read only here, after every choice was made.
3. A markdown table: mean and sample standard deviation over the seeds of test RSUM and the
   extended-positive mAP@R / R-Precision both ways, and the validation RSUM of the chosen epoch.

Everything runs through `cusa-pipe run` on the root pipeline.yaml, so reruns are cached.

    python3 scripts/ablation.py --bin target/release/cusa-pipe --seeds 0 1 2

Other pipelines: `--pairs TRAIN:EVAL ...` names the stages, `--no-search` keeps the pipeline's
own alpha and beta (step 1 skipped), e.g. the scenes-small student:

    python3 scripts/ablation.py --bin target/release/cusa-pipe --pipeline examples/scenes-small.yaml \
        --cache-dir cache --no-search --pairs small_base:eval_small_base small_cusa:eval_small_cusa
"""
import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

QUICKSTART = ["train_base:eval_base", "train_csa:eval_csa", "train_usa:eval_usa", "train_cusa:eval_cusa"]


def cusa_pipe(args, sets):
    cmd = [ARGS.bin, *args]
    if ARGS.cache_dir:
        cmd += ["--cache-dir", ARGS.cache_dir]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def run(stages, sets):
    cmd = cusa_pipe(["run", ARGS.pipeline, *stages, "-j", str(ARGS.jobs)], sets)
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}")


def metrics(stage, sets):
    cmd = cusa_pipe(["path", f"{stage}/metrics.json", ARGS.pipeline], sets)
    path = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    with open(path) as f:
        return json.load(f)


def choose(name, stage, values):
    best = None
    for v in values:
        sets = [f"params.{name}={v}"]
        run([stage], sets)
        rsum = metrics(stage, sets)["val"]["rsum"]
        print(f"{name} = {v}: val RSUM {rsum:.1f}", file=sys.stderr)
        if best is None or rsum > best[1]:
            best = (v, rsum)
    return best[0]


def stat(values):
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {sd:.1f}"


def main():
    pairs = [p.split(":", 1) for p in ARGS.pairs]
    if ARGS.no_search:
        chosen = []
        header = "alpha and beta as in the pipeline"
    else:
        # The two searches are independent: one process each, side by side.
        with ThreadPoolExecutor(2) as pool:
            alpha = pool.submit(choose, "alpha", "train_csa", ARGS.alphas)
            beta = pool.submit(choose, "beta", "train_usa", ARGS.betas)
            alpha, beta = alpha.result(), beta.result()
        chosen = [f"params.alpha={alpha}", f"params.beta={beta}"]
        header = f"alpha = {alpha}, beta = {beta} (chosen on validation)"
    rows = {train: [] for train, _ in pairs}
    for seed in ARGS.seeds:
        sets = chosen + [f"{train}.with.seed={seed}" for train, _ in pairs]
        run([ev for _, ev in pairs], sets)
        for train, ev in pairs:
            m = metrics(ev, sets)
            val = metrics(train, sets)["val"]["rsum"]
            e = m.get("extended", {})
            rows[train].append(
                {
                    "val": val,
                    "rsum": m["rsum"],
                    "map_i2t": e.get("i2t", {}).get("mAP@R", float("nan")),
                    "map_t2i": e.get("t2i", {}).get("mAP@R", float("nan")),
                    "rp_i2t": e.get("i2t", {}).get("R-P", float("nan")),
                    "rp_t2i": e.get("t2i", {}).get("R-P", float("nan")),
                }
            )
    print(f"{header}; seeds {ARGS.seeds}\n")
    print("| variant | val RSUM | test RSUM | mAP@R i2t | mAP@R t2i | R-P i2t | R-P t2i |")
    print("|---|---|---|---|---|---|---|")
    for train, _ in pairs:
        r = rows[train]
        cols = [stat([x[k] for x in r]) for k in ("val", "rsum", "map_i2t", "map_t2i", "rp_i2t", "rp_t2i")]
        v = train.removeprefix("train_")
        name = v if v == "base" or v == train else f"+{v.upper()}"
        print(f"| {name} | " + " | ".join(cols) + " |")
    print("\n" + json.dumps({"sets": chosen, "runs": rows}))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default="cusa-pipe")
    p.add_argument("--pipeline", default="pipeline.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("--betas", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("-j", "--jobs", type=int, default=2)
    p.add_argument("--cache-dir")
    p.add_argument("--pairs", nargs="+", default=QUICKSTART, help="TRAIN:EVAL stage pairs")
    p.add_argument("--no-search", action="store_true", help="keep the pipeline's alpha and beta")
    ARGS = p.parse_args()
    main()
