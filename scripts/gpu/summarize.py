#!/usr/bin/env python3
"""Merges what scripts/gpu/check.sh left in OUT into OUT/gpu-check.json and prints the table.

Parts: parity, parity-f64, train (burn), step-<precision>-<loss> (burn) and torch-<precision>-<loss> (the
PyTorch peer), each a JSON file (absent when the part died; its `.rc.json` and `.log` say how),
and <part>.mem: the GPU's used memory sampled by nvidia-smi (MiB), whose peak above idle.mem is
reported as the part's peak memory. Exit status 0 when every burn part ran and passed.
"""

import json
import os
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def peak_mib(out, name):
    try:
        idle = min(int(x) for x in open(os.path.join(out, "idle.mem")).read().split())
        used = [int(x) for x in open(os.path.join(out, name + ".mem")).read().split() if x.isdigit()]
        return max(used) - idle if used else None
    except (OSError, ValueError):
        return None


def main(out):
    files = os.listdir(out)
    names = sorted(
        {f[:-5] for f in files if f.endswith(".json") and not f.endswith(".rc.json") and f != "gpu-check.json"}
        | {f[:-8] for f in files if f.endswith(".rc.json")}
    )
    parts = {}
    for name in names:
        parts[name] = {"result": load(os.path.join(out, name + ".json")), "peak_mib": peak_mib(out, name)}
    for f in os.listdir(out):
        if f.endswith(".rc.json"):
            rc = load(os.path.join(out, f)) or {}
            parts[f[:-8]]["rc"] = rc.get("rc")
            parts[f[:-8]]["skipped"] = rc.get("skipped", False)
    ok = True
    print()
    for name in ("parity", "parity-f64", "train"):
        p = parts.get(name, {})
        r = p.get("result")
        if r is None:
            ok = False
            print(f"{name}: did not finish (rc {p.get('rc')}); see {name}.log")
            continue
        ok &= bool(r["passed"])
        if name.startswith("parity"):
            # Rows that are not judged (a diagnostic; f32 figures no bound was made for) are
            # reported, not counted.
            rows = r["outcome"]["parity"]
            judged = [x for x in rows if x.get("judged", True)]
            bad = [x for x in judged if not (x["low"] <= x["value"] <= x["high"])]
            print(f"{name} on {r['backend']}: {len(judged) - len(bad)}/{len(judged)} within bounds")
            for x in bad:
                print(f"  OUT OF BOUNDS {x['check']}: {x['value']:.3e} not in [{x['low']:.1e}, {x['high']:.1e}]")
            for x in rows:
                if not x.get("judged", True):
                    print(f"  reported: {x['check']}: {x['value']:.3e} (bound {x['high']:.1e}, not judged)")
        else:
            t = r["outcome"]["train"]
            print(
                f"train: loss {t['losses'][0]:.4f} -> {t['losses'][-1]:.4f} in {len(t['losses'])} steps, "
                f"reload difference {t['reload_difference']:.1e}: {'ok' if r['passed'] else 'FAILED'}"
            )
    print()
    header = f"{'precision':<11} {'loss':<6} {'burn img/s':>10} {'first s':>8} {'peak MiB':>9} {'torch img/s':>11} {'first s':>8} {'peak MiB':>9} {'burn/torch':>10}"
    print(header)
    steps = []
    for name in names:
        if not name.startswith("step-"):
            continue
        precision, loss = name[len("step-"):].rsplit("-", 1)
        burn = (parts[name].get("result") or {}).get("outcome", {}).get("step")
        torch_rows = parts.get("torch-" + name[len("step-"):], {}).get("result") or []
        torch = torch_rows[0] if torch_rows else None
        if burn is None:
            ok = False
        ratio = burn["images_per_s"] / torch["images_per_s"] if burn and torch else None
        row = {
            "precision": precision,
            "loss": loss,
            "burn": burn,
            "burn_peak_mib": parts[name].get("peak_mib"),
            "burn_rc": parts[name].get("rc"),
            "torch": torch,
            "torch_peak_mib": parts.get("torch-" + name[len("step-"):], {}).get("peak_mib"),
            "burn_over_torch": ratio,
        }
        steps.append(row)

        def f(v, fmt):
            return format(v, fmt) if v is not None else "-".rjust(int(fmt.rstrip("fd").split(".")[0]))

        print(
            f"{precision:<11} {loss:<6} {f(burn and burn['images_per_s'], '10.1f')} {f(burn and burn['first_step_s'], '8.1f')} "
            f"{f(row['burn_peak_mib'], '9d')} {f(torch and torch['images_per_s'], '11.1f')} {f(torch and torch['first_step_s'], '8.1f')} "
            f"{f(row['torch_peak_mib'], '9d')} {f(ratio, '10.2f')}"
        )
    summary = {"passed": ok, "parts": parts, "steps": steps}
    with open(os.path.join(out, "gpu-check.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    print(f"\n{'all burn parts passed' if ok else 'SOME BURN PARTS FAILED'}; {os.path.join(out, 'gpu-check.json')}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
