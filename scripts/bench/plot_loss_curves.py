#!/usr/bin/env python3
"""Draws training-loss curves from metrics.jsonl files as one SVG (no dependencies).

Usage: python3 scripts/bench/plot_loss_curves.py OUT.svg "TITLE" LABEL=metrics.jsonl [LABEL=metrics.jsonl ...]
"""
import json
import sys

out, title, runs = sys.argv[1], sys.argv[2], [a.split("=", 1) for a in sys.argv[3:]]
colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
W, H, L, R, T, B = 720, 420, 60, 20, 40, 50
series = []
for label, path in runs:
    rows = [json.loads(line) for line in open(path)]
    series.append((label, [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r], [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]))
xs = [s for _, t, v in series for s, _ in t + v]
ys = [y for _, t, v in series for _, y in t + v]
x0, x1, y0, y1 = 0, max(xs), min(ys) - 0.2, max(ys) + 0.2
px = lambda x: L + (x - x0) / (x1 - x0) * (W - L - R)
py = lambda y: T + (y1 - y) / (y1 - y0) * (H - T - B)
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>', f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>']
for i in range(6):
    y = y0 + (y1 - y0) * i / 5
    svg.append(f'<line x1="{L}" x2="{W - R}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#ddd"/><text x="{L - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.1f}</text>')
for i in range(7):
    x = x0 + (x1 - x0) * i / 6
    svg.append(f'<text x="{px(x):.1f}" y="{H - B + 18}" text-anchor="middle">{x:.0f}</text>')
svg.append(f'<text x="{W / 2}" y="{H - 10}" text-anchor="middle">step</text><text x="16" y="{H / 2}" transform="rotate(-90 16 {H / 2})" text-anchor="middle">loss (nats/token)</text>')
for k, (label, train, val) in enumerate(series):
    c = colors[k % len(colors)]
    pts = " ".join(f"{px(s):.1f},{py(y):.1f}" for s, y in train)
    svg.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="1.6"/>')
    for s, y in val:
        svg.append(f'<circle cx="{px(s):.1f}" cy="{py(y):.1f}" r="4" fill="{c}"/>')
    svg.append(f'<line x1="{W - 250}" x2="{W - 225}" y1="{T + 10 + 18 * k}" y2="{T + 10 + 18 * k}" stroke="{c}" stroke-width="2"/><text x="{W - 220}" y="{T + 14 + 18 * k}">{label} (dots: validation)</text>')
svg.append("</svg>")
open(out, "w").write("\n".join(svg))
