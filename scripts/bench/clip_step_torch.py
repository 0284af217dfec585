#!/usr/bin/env python3
"""The PyTorch peer of `cusa-pipe bench gpu --part step`: the same training step, timed the same way.

Model: `transformers.CLIPModel(CLIPConfig())` (ViT-B/32's shapes, random initialisation), or the
tiny test CLIP of tests/fixtures/clip-tiny/config.json with `--clip tiny`. On its projected
outputs the student's heads (LayerNorm -> Linear; a cross head per modality, and a uni head per
modality for +CUSA) and learnable temperatures (tau 0.05, tau_c 0.45, tau_ui = tau_ut 0.45),
as cusa-pipe's `clip` student has them. Loss: InfoNCE with multi-positive targets (per-sample
mean), and for +CUSA alpha 0.1 * CSA + beta 0.5 * USA on soft labels of precomputed 384-d
teacher vectors (docs/method.md). AdamW (lr 1e-5, weight decay 1e-4, eps 1e-8). Batches: four
rotating batches in which pair 5k+4 shows the image of pair 5k, 8-bit pixels copied to the
device every step and normalised there (what a tuned PyTorch loop does; cusa-pipe normalises on
the host); captions of `--text-len`
tokens (start, words, end). fp32 (TF32 off for matrix products, PyTorch's default; `--tf32`
turns it on for products and convolutions, the arithmetic of burn's CUDA f32) or
`torch.autocast(bfloat16)` for bf16-mixed. The device is synchronised after every step; the first
step is timed apart, then `--warmup` untimed steps, then the median of `--steps`.

Prints one table row per configuration and writes a JSON list with `--json`.
"""

import argparse
import json
import statistics
import sys
import time

import numpy as np

try:
    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import CLIPConfig, CLIPModel
except ImportError as e:  # the dry run on a machine without PyTorch
    print(f"skipped: {e}", file=sys.stderr)
    sys.exit(3)

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
TEACHER_DIM = 384


class Head(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.linear = torch.nn.Linear(d, d)

    def forward(self, x):
        return self.linear(self.norm(x))


class Student(torch.nn.Module):
    def __init__(self, config, cusa):
        super().__init__()
        self.clip = CLIPModel(config)
        d = config.projection_dim
        self.image_cross, self.text_cross = Head(d), Head(d)
        self.image_uni = Head(d) if cusa else None
        self.text_uni = Head(d) if cusa else None
        self.tau = torch.nn.Parameter(torch.tensor([0.05]))
        self.tau_c = torch.nn.Parameter(torch.tensor([0.45]))
        self.tau_ui = torch.nn.Parameter(torch.tensor([0.45]))
        self.tau_ut = torch.nn.Parameter(torch.tensor([0.45]))

    def forward(self, pixels, ids):
        v = self.clip.visual_projection(self.clip.vision_model(pixel_values=pixels).pooler_output)
        t = self.clip.text_projection(self.clip.text_model(input_ids=ids).pooler_output)
        out = (self.image_cross(v), self.text_cross(t))
        if self.image_uni is not None:
            out += (self.image_uni(v), self.text_uni(t))
        return out


def cos(a, b):
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T


def kl_batchmean(p, log_q):
    return (p * (torch.log(p) - log_q)).sum() / p.shape[0]


def loss_fn(model, out, targets, p_i, p_t):
    f_i, f_t = out[0].float(), out[1].float()
    s = cos(f_i, f_t) / model.tau
    base = (
        -(targets * F.log_softmax(s, dim=1)).sum(1).mean()
        - (targets.T * F.log_softmax(s.T, dim=1)).sum(1).mean()
    ) / 2
    if len(out) == 2:
        return base
    g_i, g_t = out[2].float(), out[3].float()
    s_c = cos(f_i, f_t) / model.tau_c
    csa = (kl_batchmean(p_i, F.log_softmax(s_c, 1)) + kl_batchmean(p_t, F.log_softmax(s_c.T, 1))) / 2
    usa = (
        kl_batchmean(p_i, F.log_softmax(cos(g_i, g_i) / model.tau_ui, 1))
        + kl_batchmean(p_t, F.log_softmax(cos(g_t, g_t) / model.tau_ut, 1))
    ) / 2
    return base + 0.1 * csa + 0.5 * usa


def unit_rows(rng, n, d):
    x = rng.uniform(-0.5, 0.5, size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def batches(config, batch, text_len, rng):
    side = config.vision_config.image_size
    vocab = config.text_config.vocab_size
    image_rows = np.array([i - 4 if i % 5 == 4 else i for i in range(batch)])
    same = (image_rows[:, None] == image_rows[None, :]).astype(np.float32)
    targets = same / same.sum(1, keepdims=True)
    out = []
    for k in range(4):
        pixels = rng.integers(0, 256, size=(batch, side, side, 3), dtype=np.uint8)[image_rows]
        words = (np.arange(batch)[:, None] * 31 + np.arange(text_len - 2)[None, :] * 7 + k) % (vocab - 2)
        ids = np.concatenate(
            [np.full((batch, 1), vocab - 2), words, np.full((batch, 1), vocab - 1)], axis=1
        ).astype(np.int64)
        u = unit_rows(rng, batch, TEACHER_DIM)[image_rows]
        v = unit_rows(rng, batch, TEACHER_DIM)
        out.append((pixels, ids, u, v))
    return out, targets


def soft_labels(x):
    return torch.softmax(cos(x, x), dim=1)


def run(args, precision, cusa, device):
    if args.clip == "tiny":
        config = CLIPConfig.from_json_file(args.config)
    else:
        config = CLIPConfig()  # ViT-B/32's shapes
    # The end-of-text token is the vocabulary's last id, as in cusa-pipe's batches.
    config.text_config.eos_token_id = config.text_config.vocab_size - 1
    torch.manual_seed(0)
    model = Student(config, cusa).to(device)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=1e-4, eps=1e-8)
    data, targets = batches(config, args.batch, args.text_len, np.random.default_rng(0))
    targets = torch.from_numpy(targets).to(device)
    mean = torch.from_numpy(MEAN).to(device).view(1, 3, 1, 1)
    std = torch.from_numpy(STD).to(device).view(1, 3, 1, 1)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def step(k):
        pixels, ids, u, v = data[k % 4]
        x = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float().div_(255)
        x = ((x - mean) / std).contiguous()
        ids = torch.from_numpy(ids).to(device)
        p_i = soft_labels(torch.from_numpy(u).to(device)) if cusa else None
        p_t = soft_labels(torch.from_numpy(v).to(device)) if cusa else None
        with torch.no_grad():
            for p in (model.tau, model.tau_c, model.tau_ui, model.tau_ut):
                p.clamp_(0.01, 1.0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            out = model(x, ids)
        loss = loss_fn(model, out, targets, p_i, p_t)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        value = loss.item()
        if cuda:
            torch.cuda.synchronize(device)
        return value

    times, last = [], float("nan")
    started = time.perf_counter()
    last = step(0)
    first = time.perf_counter() - started
    for i in range(1, 1 + args.warmup + args.steps):
        started = time.perf_counter()
        last = step(i)
        if i > args.warmup:
            times.append(time.perf_counter() - started)
    median = statistics.median(times) if times else first
    row = {
        "peer": "pytorch",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "clip": args.clip,
        "loss": "+cusa" if cusa else "base",
        "precision": precision,
        "batch": args.batch,
        "text_len": args.text_len,
        "first_step_s": first,
        "median_step_s": median,
        "images_per_s": args.batch / median,
        "steps": args.steps,
        "warmup": args.warmup,
        "last_loss": last,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }
    if cuda:
        row["peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        row["peak_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
    del model, optim
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--clip", default="ViT-B-32", choices=["ViT-B-32", "tiny"])
    ap.add_argument("--config", default="tests/fixtures/clip-tiny/config.json")
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16-mixed"])
    ap.add_argument("--loss", nargs="+", default=["base", "cusa"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--text-len", type=int, default=77)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tf32", action="store_true", help="f32 products and convolutions in TF32")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.device == "cuda" and not torch.cuda.is_available():
        print("skipped: torch sees no CUDA device", file=sys.stderr)
        sys.exit(3)
    device = torch.device(args.device)
    rows = []
    print(f"{'loss':<8} {'precision':<11} {'batch':>6} {'first (s)':>10} {'median (ms)':>12} {'images/s':>9} {'peak MiB':>9}")
    for precision in args.precision:
        for loss in args.loss:
            row = run(args, precision, loss == "cusa", device)
            rows.append(row)
            print(
                f"{row['loss']:<8} {precision:<11} {args.batch:>6} {row['first_step_s']:>10.2f} "
                f"{row['median_step_s'] * 1e3:>12.1f} {row['images_per_s']:>9.1f} "
                f"{row.get('peak_reserved_mib', float('nan')):>9.0f}",
                flush=True,
            )
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
