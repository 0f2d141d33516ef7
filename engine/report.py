"""Plots and a health summary of a run, from its output_dir/metrics.jsonl.

    python -m engine.report RUN_DIR [--out DIR]        (or: python pretrain.py report RUN_DIR)

Writes RUN_DIR/report/{loss,grad_norm,perplexity,schedule,throughput,overview}.png and summary.txt, and
prints the summary: final/min loss and its trend, the share of gradient norms inside the 0.5-2 band the
HF example recommends, the codebook perplexity trend and collapse alarms, skipped non-finite updates,
throughput and MFU, and a one-line verdict.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

GRAD_BAND = (0.5, 2.0)
PLOTS = ("loss", "grad_norm", "perplexity", "schedule", "throughput")


def load_records(run_dir: str) -> dict[str, list[dict]]:
    """metrics.jsonl split by `split` (train, eval, guard), each list in file order."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: pass the --output_dir of a run")
    out: dict[str, list[dict]] = {"train": [], "eval": [], "guard": []}
    with open(path) as fh:
        for line in fh:
            if line.strip():
                rec = json.loads(line)
                out.setdefault(rec.get("split", "train"), []).append(rec)
    return out


def codebook_size(run_dir: str) -> int | None:
    try:
        with open(os.path.join(run_dir, "config.json")) as fh:
            cfg = json.load(fh)
        return int(cfg["num_codevector_groups"]) * int(cfg["num_codevectors_per_group"])
    except (OSError, KeyError, ValueError):
        return None


def collapse_threshold(run_dir: str, guard: list[dict]) -> float | None:
    """The collapse alarm's threshold: from an alarm record, else the run's flag, else the default for its
    config (see engine/health.py)."""
    for g in guard:
        if g.get("event") == "collapse":
            return g.get("threshold")
    try:
        with open(os.path.join(run_dir, "run_args.json")) as fh:
            flag = json.load(fh).get("min_codevector_perplexity")
        if flag is not None:
            return float(flag) or None
        with open(os.path.join(run_dir, "config.json")) as fh:
            cfg = json.load(fh)
    except (OSError, ValueError):
        return None
    from types import SimpleNamespace
    from engine.health import default_collapse_threshold
    return default_collapse_threshold(SimpleNamespace(**cfg))


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, leaving out records without a finite number for it."""
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            steps.append(r["step"])
            values.append(float(v))
    return steps, values


def _head_tail_mean(values: list[float], frac: float = 0.2) -> tuple[float, float]:
    n = max(1, int(len(values) * frac))
    return statistics.fmean(values[:n]), statistics.fmean(values[-n:])


def summarize(run_dir: str, recs: dict[str, list[dict]] | None = None) -> tuple[str, list[str]]:
    """The text summary and the list of warnings (empty = healthy)."""
    recs = recs or load_records(run_dir)
    train, evals, guard = recs["train"], recs["eval"], recs["guard"]
    lines, warnings = [f"run {os.path.abspath(run_dir)}"], []
    if not train:
        return "\n".join(lines + ["no training records in metrics.jsonl"]), ["no training records"]
    lines.append(f"steps logged: {len(train)} (step {train[0]['step']} to {train[-1]['step']})")

    steps, loss = series(train, "loss")
    if loss:
        first, last = _head_tail_mean(loss)
        i_min = min(range(len(loss)), key=loss.__getitem__)
        change = (last - first) / abs(first) if first else 0.0
        lines.append(f"loss: first {loss[0]:.4g}, final {loss[-1]:.4g}, min {loss[i_min]:.4g} at step {steps[i_min]}; "
                     f"mean of last 20% vs first 20%: {change:+.1%}")
        if len(loss) >= 5 and change >= 0:
            warnings.append("the training loss is not falling")
    nonfinite_logged = sum(1 for r in train if "loss" in r and not (isinstance(r["loss"], (int, float))
                                                                  and math.isfinite(r["loss"])))
    if nonfinite_logged:
        warnings.append(f"{nonfinite_logged} logged training losses are NaN/inf")
    for key in ("contrastive_loss", "diversity_loss"):
        _, v = series(train, key)
        if v:
            lines.append(f"{key}: first {v[0]:.4g}, final {v[-1]:.4g}")
    if evals:
        _, val = series(evals, "val_loss")
        if val:
            lines.append(f"validation loss: first {val[0]:.4g}, final {val[-1]:.4g}, min {min(val):.4g} "
                         f"({len(val)} evaluations)")
            if len(val) >= 3 and val[-1] > 1.05 * min(val):
                warnings.append("the validation loss rose from its minimum (overfitting a small set, or diverging)")

    _, gn = series(train, "grad_norm")
    if gn:
        inside = sum(GRAD_BAND[0] <= g <= GRAD_BAND[1] for g in gn) / len(gn)
        below = sum(g < GRAD_BAND[0] for g in gn)
        above = sum(g > GRAD_BAND[1] for g in gn)
        lines.append(f"grad norm: median {statistics.median(gn):.3g}, max {max(gn):.3g}; {inside:.0%} of logged steps "
                     f"inside {GRAD_BAND[0]}-{GRAD_BAND[1]} ({below} below, {above} above)")
        if inside < 0.5:
            warnings.append(f"only {inside:.0%} of gradient norms inside {GRAD_BAND[0]}-{GRAD_BAND[1]}")

    size = codebook_size(run_dir)
    for key in ("codevector_perplexity", "code_perplexity"):
        _, v = series(train, key)
        if v:
            first, last = _head_tail_mean(v)
            trend = "rising" if last > first * 1.05 else "falling" if last < first * 0.95 else "flat"
            of = f" of {size}" if size else ""
            lines.append(f"{key}: first {v[0]:.4g}, final {v[-1]:.4g}{of}, min {min(v):.4g}; {trend}")
    alarms = [g for g in guard if g.get("event") == "collapse"]
    lines.append(f"codebook collapse alarms: {len(alarms)}"
                 + (f" (first at step {alarms[0]['step']}, threshold {alarms[0].get('threshold')})" if alarms else ""))
    if alarms:
        warnings.append(f"codebook collapse alarm at {len(alarms)} logged steps")

    skipped = [g for g in guard if g.get("event") == "nonfinite"]
    lines.append(f"skipped non-finite updates: {len(skipped)}"
                 + (f" at steps {[g['step'] for g in skipped][:20]}" if skipped else ""))
    for g in skipped[:5]:
        ids = g.get("nonfinite_loss_ids") or g.get("ids") or []
        lines.append(f"  step {g['step']}: {'non-finite loss' if g.get('nonfinite_loss') else 'non-finite gradients'}"
                     f" -- utterances {ids[:8]}{' ...' if len(ids) > 8 else ''}")
    if skipped:
        warnings.append(f"{len(skipped)} updates skipped for non-finite loss/gradients")

    _, tput = series(train, "audio_s_per_s")
    _, util = series(train, "mfu")
    _, mem = series(train, "gpu_mem_peak_gib")
    if tput:
        lines.append(f"throughput: median {statistics.median(tput):.4g} audio-s/s"
                     + (f", MFU median {statistics.median(util):.1%}" if util else ", MFU n/a (CPU or unknown GPU)")
                     + (f", GPU memory peak {max(mem):.2f} GiB" if mem else ""))
    lines.append("verdict: " + ("HEALTHY" if not warnings else "CHECK: " + "; ".join(warnings)))
    return "\n".join(lines), warnings


def plot(run_dir: str, out_dir: str, recs: dict[str, list[dict]] | None = None) -> list[str]:
    """Write the PNGs; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    recs = recs or load_records(run_dir)
    train, evals, guard = recs["train"], recs["eval"], recs["guard"]
    skipped = [g["step"] for g in guard if g.get("event") == "nonfinite"]
    size = codebook_size(run_dir)
    threshold = collapse_threshold(run_dir, guard)
    os.makedirs(out_dir, exist_ok=True)

    def mark_skips(ax):
        for i, s in enumerate(skipped):
            ax.axvline(s, color="red", alpha=0.35, lw=1, label="skipped (non-finite)" if i == 0 else None)

    def draw(name, ax):
        if name == "loss":
            for key, style in (("loss", "-"), ("contrastive_loss", "--")):
                ax.plot(*series(train, key), style, label=key)
            for key, style in (("val_loss", "o-"), ("val_contrastive_loss", "s--")):
                s, v = series(evals, key)
                if v:
                    ax.plot(s, v, style, ms=4, label=key)
            ax.set_ylabel("loss / masked frame")
            twin = ax.twinx()
            twin.plot(*series(train, "diversity_loss"), ":", color="tab:gray")
            twin.set_ylabel("diversity loss (dotted)", color="tab:gray")
            ax.set_title("loss parts (per masked frame)")
        elif name == "grad_norm":
            ax.axhspan(*GRAD_BAND, color="green", alpha=0.12, label=f"healthy {GRAD_BAND[0]}-{GRAD_BAND[1]}")
            gs, gv = series(train, "grad_norm")
            ax.plot(gs, gv, label="grad norm")
            if gv and max(gv) > 20 * max(min(gv), 1e-12):  # log scale only for a wide range
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_title("gradient norm")
        elif name == "perplexity":
            ax.plot(*series(train, "codevector_perplexity"), label="codevector (soft)")
            ax.plot(*series(train, "code_perplexity"), label="code (hard)")
            s, v = series(evals, "val_code_perplexity")
            if v:
                ax.plot(s, v, "o-", ms=4, label="val code")
            if size:
                ax.axhline(size, color="gray", ls="--", lw=1, label=f"codebook size {size}")
            if threshold:
                ax.axhline(threshold, color="red", ls=":", lw=1, label=f"collapse alarm {threshold:g}")
            ax.set_title("codebook perplexity")
        elif name == "schedule":
            ax.plot(*series(train, "lr"), color="tab:blue", label="learning rate")
            ax.set_ylabel("learning rate", color="tab:blue")
            twin = ax.twinx()
            twin.plot(*series(train, "temperature"), color="tab:orange", label="gumbel temperature")
            twin.set_ylabel("gumbel temperature", color="tab:orange")
            twin.ticklabel_format(axis="y", useOffset=False)
            ax.set_title("learning rate and gumbel temperature")
        elif name == "throughput":
            ax.plot(*series(train, "audio_s_per_s"), color="tab:blue", label="audio-s/s")
            ax.set_ylabel("audio seconds / second", color="tab:blue")
            s, v = series(train, "mfu")
            if v:
                twin = ax.twinx()
                twin.plot(s, [100 * x for x in v], color="tab:green", label="MFU %")
                twin.set_ylabel("MFU %", color="tab:green")
            ax.set_title("throughput" + ("" if v else " (MFU n/a)"))
        mark_skips(ax)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")

    paths = []
    for name in PLOTS:
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        draw(name, ax)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, f"{name}.png"))
        fig.savefig(paths[-1])
        plt.close(fig)
    fig, axes = plt.subplots(2, 3, figsize=(18, 9), dpi=80)
    for name, ax in zip(PLOTS, axes.flat):
        draw(name, ax)
    axes.flat[-1].axis("off")
    axes.flat[-1].text(0, 1, summarize(run_dir, recs)[0], va="top", family="monospace", fontsize=7, wrap=True)
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "overview.png"))
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run's --output_dir (holding metrics.jsonl)")
    p.add_argument("--out", default=None, help="where the PNGs and summary.txt go (default: RUN_DIR/report)")
    p.add_argument("--no_plots", action="store_true", help="print the summary only")
    args = p.parse_args(argv)
    try:
        recs = load_records(args.run_dir)
    except FileNotFoundError as exc:
        print(f"report: error: {exc}", file=sys.stderr)
        return 2
    out_dir = args.out or os.path.join(args.run_dir, "report")
    text, _ = summarize(args.run_dir, recs)
    if not args.no_plots:
        paths = plot(args.run_dir, out_dir, recs)
        text += f"\nplots: {', '.join(os.path.relpath(q, args.run_dir) for q in paths)}"
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "summary.txt"), "w") as fh:
        fh.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
