"""The demo's report: the drifted device's recovery (its edge-only accuracy over time, with the drift's
start, the alert, the improvement loop's start and the retrained model's first answer marked), PNG plots
of accuracy, escalation and confidence over time per device, and an HTML page with the summary.

matplotlib renders off-screen (the Agg backend): the demo runs on headless machines.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported: headless machines have no display
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from demo.recovery import Recovery
from demo.watch import BUCKET_S, FleetWatch

RECOVERY_BUCKET_S = 4.0  # the recovery plot's points: ~160 answers each at the demo's 40 inputs/s


def write_report(watch: FleetWatch, summary: Sequence[str], out_dir: Path, recovery: Recovery | None = None) -> Path:
    """Write report.html and its PNGs into `out_dir`; return the HTML path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images = [] if recovery is None else [_recovery_plot(watch, recovery, out_dir / "recovery.png")]
    images += [_accuracy_plot(watch, out_dir / "accuracy.png"), _confidence_plot(watch, out_dir / "confidence.png")]
    page = out_dir / "report.html"
    page.write_text(_html(watch, summary, [p.name for p in images]), encoding="utf-8")
    return page


def _mark_events(ax: Axes, watch: FleetWatch, device: str | None = None) -> None:
    for alert in watch.alerts:
        if device is None or alert.device == device:
            color = "tab:red" if alert.state == "firing" else "tab:green"
            ax.axvline(alert.at, color=color, linestyle="--", linewidth=1)
    for ack in watch.acks:
        if (device is None or ack.device == device) and ack.state in ("installed", "rolled_back"):
            ax.axvline(ack.at, color="tab:purple", linestyle=":", linewidth=1.5)


def _recovery_plot(watch: FleetWatch, r: Recovery, path: Path) -> Path:
    """The drifted device's edge-only accuracy and escalation rate per RECOVERY_BUCKET_S, events marked."""
    buckets: dict[int, list[int]] = {}  # bucket -> [answers, edge right, unsure]
    for answer in watch.snapshot(r.device):
        b = buckets.setdefault(int(answer.at // RECOVERY_BUCKET_S), [0, 0, 0])
        b[0] += 1
        b[1] += answer.edge_right
        b[2] += answer.unsure
    keys = sorted(buckets)
    xs = [(k + 0.5) * RECOVERY_BUCKET_S for k in keys]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.plot(
        xs, [buckets[k][1] / buckets[k][0] for k in keys], marker=".", color="tab:orange", label="accuracy edge-only"
    )
    ax.plot(xs, [buckets[k][2] / buckets[k][0] for k in keys], color="tab:gray", alpha=0.7, label="escalation rate")
    if r.before.accuracy is not None:
        ax.axhline(r.before.accuracy, color="tab:orange", linestyle=":", linewidth=1, label="before drift")
    events = (
        (r.drift_at, "drift starts", "black", "-"),
        (r.alert_at, "drift alert", "tab:red", "--"),
        (r.loop_at, "loop started", "tab:blue", "--"),
        (r.installed_at, f"new model ({r.candidate})", "tab:green", "-"),
        (r.promoted_at, "promoted", "tab:green", ":"),
    )
    for at, label, color, style in events:
        if at is not None:
            ax.axvline(at, color=color, linestyle=style, linewidth=1.5, label=label)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{r.device}: recovery through the improvement loop")
    ax.set_xlabel(f"seconds since start (points: {RECOVERY_BUCKET_S:g} s)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 0.22), fontsize=7, ncol=4)  # the band no line crosses
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _accuracy_plot(watch: FleetWatch, path: Path) -> Path:
    devices = sorted(watch.devices)
    fig, axes = plt.subplots(len(devices), 1, figsize=(9, 2.2 * max(1, len(devices))), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], devices, strict=True):
        buckets = sorted(watch.devices[name].buckets.items())
        xs = [k * BUCKET_S for k, b in buckets if b.with_truth]
        edge = [b.edge_right / b.with_truth for _, b in buckets if b.with_truth]
        final = [b.final_right / b.with_truth for _, b in buckets if b.with_truth]
        esc = [b.escalated / b.results for _, b in buckets if b.with_truth]
        ax.plot(xs, edge, label="accuracy edge-only", color="tab:orange")
        ax.plot(xs, final, label="accuracy with escalation", color="tab:blue")
        ax.plot(xs, esc, label="escalation rate", color="tab:gray", alpha=0.7)
        _mark_events(ax, watch, name)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="lower left", fontsize=8, ncol=3)
    axes[-1, 0].set_xlabel("seconds since start (red: drift alert, green: resolved, purple: model switch)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _confidence_plot(watch: FleetWatch, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 3))
    for name in sorted(watch.devices):
        windows = watch.devices[name].windows
        ax.plot([w[0] - watch.started for w in windows], [w[1] for w in windows], label=name)
    _mark_events(ax, watch)
    ax.set_ylabel("mean confidence per window")
    ax.set_xlabel("seconds since start")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _html(watch: FleetWatch, summary: Sequence[str], images: list[str]) -> str:
    alerts = "".join(
        f"<tr><td>{a.at:.1f}</td><td>{html.escape(a.device)}</td><td>{html.escape(a.kind)}</td>"
        f"<td>{a.state}</td><td>{a.score:.3f}</td><td>{a.threshold:.3f}</td><td>{html.escape(a.model)}</td></tr>"
        for a in watch.alerts
    )
    acks = "".join(
        f"<tr><td>{a.at:.1f}</td><td>{html.escape(a.device)}</td><td>{html.escape(a.state)}</td>"
        f"<td>{html.escape(a.model)}</td><td>{html.escape(a.reason)}</td></tr>"
        for a in watch.acks
    )
    imgs = "".join(f'<p><img src="{name}" alt="{name}"></p>' for name in images)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>edgefleet demo report</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}td,th{{padding:2px 8px}}
pre{{background:#f4f4f4;padding:1em}}</style></head><body>
<h1>edgefleet demo report</h1>
<pre>{html.escape(chr(10).join(summary))}</pre>
{imgs}
<h2>Drift alerts</h2>
<table><tr><th>t (s)</th><th>device</th><th>kind</th><th>state</th><th>score</th><th>threshold</th><th>model</th></tr>
{alerts}</table>
<h2>Command acks (rollout)</h2>
<table><tr><th>t (s)</th><th>device</th><th>state</th><th>model</th><th>reason</th></tr>{acks}</table>
</body></html>
"""
