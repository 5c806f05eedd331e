#!/usr/bin/env python3
"""Draws training tokens/s against sequence length, ours and PyTorch, one panel per benchmark
config, from the JSON files scripts/bench/bench_seq_len.sh writes (no dependencies).

Usage: python3 scripts/bench/plot_seq_len.py runs/bench-seq docs/bench-seq-len.svg
"""
import glob
import json
import os
import re
import sys

src, out = sys.argv[1], sys.argv[2]
points = {}  # config -> who -> [(seq, tokens/s)]
for path in glob.glob(os.path.join(src, "*.json")):
    m = re.match(r"(.+)-b(\d+)-s(\d+)-(ours|torch)\.json$", os.path.basename(path))
    if m:
        cfg, batch, seq, who = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        points.setdefault((cfg, batch), {}).setdefault(who, []).append((seq, json.load(open(path))["train_tokens_per_s"]))
panels = sorted(points)
PW, H, L, R, T, B = 400, 380, 64, 16, 48, 56
W = PW * len(panels)
colors = {"ours": "#d62728", "torch": "#1f77b4"}
names = {"ours": "ours (Burn flex)", "torch": "PyTorch eager"}
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">Training tokens/s against sequence length (f32, 2 CPU threads)</text>']
for k, (cfg, batch) in enumerate(panels):
    ox = k * PW
    series = {who: sorted(p) for who, p in points[(cfg, batch)].items()}
    seqs = sorted({s for p in series.values() for s, _ in p})
    ymax = max(v for p in series.values() for _, v in p) * 1.15
    px = lambda i: ox + L + i / max(len(seqs) - 1, 1) * (PW - L - R)  # log2 spacing: one step per doubling
    py = lambda y: T + (1 - y / ymax) * (H - T - B)
    svg.append(f'<text x="{ox + PW / 2}" y="38" text-anchor="middle">{cfg}, batch {batch}</text>')
    for i in range(6):
        y = ymax * i / 5
        svg.append(f'<line x1="{ox + L}" x2="{ox + PW - R}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#ddd"/>'
                   f'<text x="{ox + L - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.0f}</text>')
    for i, s in enumerate(seqs):
        svg.append(f'<text x="{px(i):.1f}" y="{H - B + 18}" text-anchor="middle">{s}</text>')
    svg.append(f'<text x="{ox + L + (PW - L - R) / 2}" y="{H - B + 36}" text-anchor="middle">sequence length</text>')
    if k == 0:
        svg.append(f'<text x="14" y="{H / 2}" transform="rotate(-90 14 {H / 2})" text-anchor="middle">tokens/s</text>')
    for j, (who, p) in enumerate(sorted(series.items())):
        pts = " ".join(f"{px(seqs.index(s)):.1f},{py(v):.1f}" for s, v in p)
        svg.append(f'<polyline points="{pts}" fill="none" stroke="{colors[who]}" stroke-width="2"/>')
        svg += [f'<circle cx="{px(seqs.index(s)):.1f}" cy="{py(v):.1f}" r="3" fill="{colors[who]}"/>' for s, v in p]
        svg.append(f'<rect x="{ox + L + 10}" y="{T + 8 + 16 * j}" width="12" height="3" fill="{colors[who]}"/>'
                   f'<text x="{ox + L + 28}" y="{T + 13 + 16 * j}">{names[who]}</text>')
svg.append("</svg>")
open(out, "w").write("\n".join(svg) + "\n")
for (cfg, batch) in panels:
    for who, p in sorted(points[(cfg, batch)].items()):
        print(cfg, batch, who, " ".join(f"{s}:{v:.0f}" for s, v in sorted(p)))
