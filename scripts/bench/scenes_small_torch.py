#!/usr/bin/env python3
"""The PyTorch CPU peer of `cusa-pipe bench train`: the `scenes-small` student's training step.

The same architecture as stages/src/ml/scenes_small.rs, written the way a PyTorch user writes it:
3×3 stride-2 `Conv2d` (padding 1) + GELU per channel entry (48 px, [32, 64, 128, 256]), global
average pooling; word + learned position embeddings (vocabulary 90, width 128), a pre-LayerNorm
`TransformerEncoder` (2 layers, 4 heads, feed-forward 256, GELU, no dropout), mean over the
real words; per modality a cross head LayerNorm → Linear(·, 256) with N(0, 0.02²) weights; the
base loss (symmetric InfoNCE on L2-normalised embeddings, learnable τ starting at 0.05, clamped
to [0.01, 0.1]); AdamW (lr 1e-3, weight decay 1e-4). A step is what cusa-pipe times: the batch
tensors built from uint8 pictures and word ids, forward, loss, backward, optimiser step.

    python3 scenes_small_torch.py [--batch 128] [--steps 10] [--warmup 2] [--threads 2]

Prints one JSON object: the median seconds per step and the runtime it ran on.
"""
import argparse
import json
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class ScenesSmall(nn.Module):
    def __init__(self, channels=(32, 64, 128, 256), vocab=90, max_words=32, width=128, layers=2, heads=4, dim=256):
        super().__init__()
        convs, c_in = [], 3
        for c in channels:
            convs += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GELU()]
            c_in = c
        self.convs = nn.Sequential(*convs)
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(max_words, width)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.image_head = nn.Sequential(nn.LayerNorm(c_in), nn.Linear(c_in, dim))
        self.text_head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))
        for head in (self.image_head, self.text_head):
            nn.init.normal_(head[1].weight, 0.0, 0.02)
        self.tau = nn.Parameter(torch.tensor(0.05))

    def forward(self, pixels, ids, pad):
        x = self.convs(pixels).mean(dim=(2, 3))
        l = ids.shape[1]
        h = self.encoder(self.tokens(ids) + self.positions.weight[:l], src_key_padding_mask=pad)
        keep = (~pad).float().unsqueeze(-1)
        t = (h * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return F.normalize(self.image_head(x), dim=-1), F.normalize(self.text_head(t), dim=-1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(53)
    batches = [
        (
            rng.integers(0, 256, size=(args.batch, 48, 48, 3), dtype=np.uint8),
            np.array([[2 + (i * 31 + w * 7 + k) % 88 for w in range(12)] for i in range(args.batch)], dtype=np.int64),
        )
        for k in range(4)
    ]
    model = ScenesSmall()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    labels = torch.arange(args.batch)
    times = []
    for i in range(args.warmup + args.steps):
        pixels, words = batches[i % len(batches)]
        t = time.perf_counter()
        x = (torch.from_numpy(pixels).float() / 255.0 - 0.5) / 0.25
        x = x.permute(0, 3, 1, 2).contiguous()
        ids = torch.from_numpy(words)
        pad = torch.zeros(ids.shape, dtype=torch.bool)
        with torch.no_grad():
            model.tau.clamp_(0.01, 0.1)
        fi, ft = model(x, ids, pad)
        logits = fi @ ft.T / model.tau
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    print(
        json.dumps(
            {
                "seconds_per_step": statistics.median(times),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "mkldnn": bool(torch.backends.mkldnn.is_available()),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            }
        )
    )


if __name__ == "__main__":
    main()
