"""The comparison report: ``report.json``, ``report.md`` and ``tradeoff.png``.

``write_report(out_dir, results, trajectories=None)``:

* ``results``: ``{name: EvalResult | path of a saved one}``, one entry per model
  (methods, plus the ``target`` model before unlearning and the ``retain`` model trained
  without the forget set, recognised by name or by ``meta["role"]``);
* ``trajectories``: ``{method: [(step, EvalResult | path | aggregates dict), ...]}``,
  evaluations of one run at successive checkpoints (or results with ``meta["step"]``).

``report.json`` holds every model's aggregates and the path of its per-sample file
(results not yet saved are written to ``out_dir/results/<name>.json``); ``report.md``
a table with one row per model; ``tradeoff.png`` forget quality (log scale) against
model utility for TOFU (for MUSE-only reports: forget vs retain KnowMem ROUGE); with
trajectories, ``curves/<metric>.png``: each metric over steps, every method on the same axes.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from ngdiff_jax.evaluation.results import EvalResult, json_safe

TOFU_COLUMNS = (
    "forget_quality",
    "model_utility",
    "forget_truth_ratio",
    "forget_Q_A_Prob",
    "forget_Q_A_ROUGE",
    "retain_Q_A_Prob",
    "retain_Q_A_ROUGE",
    "retain_Truth_Ratio",
    "privleak",
    "extraction_strength",
)
MUSE_COLUMNS = (
    "forget_verbmem_ROUGE",
    "forget_knowmem_ROUGE",
    "retain_knowmem_ROUGE",
    "privleak",
    "mia_min_k",
)
# membership-inference attacks (evaluation/mia.py): a table of AUC and privleak per attack
MIA_ATTACKS = ("min_k", "loss", "zlib", "min_k_plus_plus", "gradnorm", "reference")
FQ_FLOOR = 1e-30  # p-values below this are drawn at the floor of the log axis


def _as_result(name: str, r) -> EvalResult:
    if isinstance(r, EvalResult):
        return r
    if isinstance(r, (str, Path)):
        return EvalResult.load(r)
    raise TypeError(f"Result {name!r} must be an EvalResult or the path of a saved one, got {type(r).__name__}.")


def _role(name: str, r: EvalResult, target: str, retain: str) -> str:
    role = r.meta.get("role")
    if role in ("target", "retain"):
        return role
    if name == target:
        return "target"
    if name == retain:
        return "retain"
    return "method"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "model"


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
            return f"{v:.2e}"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def _trajectory_points(method: str, items) -> list[dict]:
    points = []
    for n, item in enumerate(items):
        if isinstance(item, EvalResult):
            step, agg = item.meta.get("step", n), item.aggregates
        elif isinstance(item, (str, Path)):
            r = EvalResult.load(item)
            step, agg = r.meta.get("step", n), r.aggregates
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            step, x = item
            if isinstance(x, (str, Path)):
                x = EvalResult.load(x)
            agg = x.aggregates if isinstance(x, EvalResult) else dict(x)
        else:
            raise TypeError(
                f"Trajectory {method!r} item {n} must be (step, result|path|aggregates) or an EvalResult."
            )
        points.append({"step": step, **{k: agg.get(k) for k in (*TOFU_COLUMNS, *MUSE_COLUMNS)}})
    return sorted(points, key=lambda p: p["step"])


def write_report(
    out_dir: str | Path,
    results: dict,
    trajectories: dict | None = None,
    *,
    target: str = "target",
    retain: str = "retain",
    title: str | None = None,
) -> dict:
    """Write ``report.json``, ``report.md`` and ``tradeoff.png`` into ``out_dir``; return their paths."""
    if not results and not trajectories:
        raise ValueError("write_report needs at least one result or trajectory.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = {name: _as_result(name, r) for name, r in (results or {}).items()}
    for name, r in models.items():
        if r.path is None or not Path(r.path).is_file():
            r.save(out / "results" / f"{_safe(name)}.json")
    traj = {m: _trajectory_points(m, items) for m, items in (trajectories or {}).items()}

    entries = {
        name: {
            "benchmark": r.benchmark,
            "role": _role(name, r, target, retain),
            "aggregates": r.aggregates,
            "per_sample_file": str(Path(r.path).resolve()),
            "meta": r.meta,
            "timings": r.timings,
        }
        for name, r in models.items()
    }
    paths = {"json": out / "report.json", "md": out / "report.md", "png": out / "tradeoff.png"}
    (paths["json"]).write_text(json.dumps(json_safe({"models": entries, "trajectories": traj}), indent=1))
    curves = write_curves(out / "curves", traj) if traj else {}
    paths["md"].write_text(_markdown(entries, traj, title, curves))
    _plot(paths["png"], entries, traj, title)
    out_paths = {k: str(v) for k, v in paths.items()}
    if curves:
        out_paths["curves"] = str(out / "curves")
    return out_paths


def write_curves(out_dir: str | Path, traj: dict) -> dict[str, str]:
    """One PNG per metric over training steps, every method on the same axes:
    ``<out_dir>/<metric>.png`` for each metric with values in ``traj`` (``{method: [points]}``,
    points as in report.json's trajectories). Returns ``{metric: path}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    keys = [k for k in dict.fromkeys(k for pts in traj.values() for p in pts for k in p) if k != "step"]
    written = {}
    for key in keys:
        series = {m: [(p["step"], float(p[key])) for p in pts if isinstance(p.get(key), (int, float))
                      and math.isfinite(float(p[key]))] for m, pts in traj.items()}  # fmt: skip
        series = {m: v for m, v in series.items() if v}
        if not series:
            continue
        out.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
        for m, pts in series.items():
            ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", ms=3, label=m)
        if key == "forget_quality" and all(v > 0 for pts in series.values() for _, v in pts):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(f"{key} over training")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{_safe(key)}.png"
        fig.savefig(path)
        plt.close(fig)
        written[key] = str(path)
    return written


def _markdown(entries: dict, traj: dict, title: str | None, curves: dict | None = None) -> str:
    lines = [f"# {title or 'Unlearning evaluation'}", ""]
    for bench, cols in (("tofu", TOFU_COLUMNS), ("muse", MUSE_COLUMNS)):
        rows = {n: e for n, e in entries.items() if e["benchmark"] == bench}
        if not rows:
            continue
        lines += [f"## {bench.upper()}", ""]
        lines.append("| model | role | " + " | ".join(cols) + " |")
        lines.append("|---|---|" + "---|" * len(cols))
        for n, e in rows.items():
            lines.append(
                f"| {n} | {e['role']} | " + " | ".join(_fmt(e["aggregates"].get(c)) for c in cols) + " |"
            )
        lines.append("")
    robust = {n: e for n, e in entries.items() if e["aggregates"].get("robust_worst_forget_Q_A_ROUGE") is not None}
    if robust:  # ngdiff eval --robustness: the forget answers after relearning, quantization, rephrasing
        from ngdiff_jax.evaluation.robustness import robustness_table

        lines += ["## Robustness of forgetting: forget ROUGE / forget Prob after each check", ""]
        lines += robustness_table({n: (e["aggregates"], e["meta"].get("robustness")) for n, e in robust.items()})
        lines += ["", "Each check measures the forget answers again on a changed model or prompt (relearning "
                  "on half the forget rows, bfloat16, int8/int4 round trips, paraphrased questions, other "
                  "prompt formats); a model that forgot keeps every column near its baseline "
                  "(docs/METRICS.md).", ""]
    general = {n: e for n, e in entries.items() if e["benchmark"] == "lm-eval"}
    if general:  # lm-evaluation-harness tasks (ngdiff eval --benchmark lm-eval): general utility
        cols = sorted({k for e in general.values() for k in e["aggregates"] if not k.endswith("_stderr")})
        lines += ["## General utility (lm-evaluation-harness)", ""]
        lines.append("| model | role | " + " | ".join(cols) + " |")
        lines.append("|---|---|" + "---|" * len(cols))
        for n, e in general.items():
            agg = e["aggregates"]
            cells = [_fmt(agg.get(c)) + (f" ± {_fmt(agg[c + '_stderr'])}" if agg.get(c + "_stderr") is not None
                                         else "") for c in cols]  # fmt: skip
            lines.append(f"| {n} | {e['role']} | " + " | ".join(cells) + " |")
        lines += ["", "lm-eval's own metrics per task (value ± its standard error); docs/METRICS.md.", ""]
    attacks = [a for a in MIA_ATTACKS if any(e["aggregates"].get(f"mia_{a}") is not None for e in entries.values())]
    if len(attacks) > 1:
        lines += ["## Membership inference (forget vs holdout): AUC / privleak", ""]
        lines.append("| model | " + " | ".join(f"mia_{a}" for a in attacks) + " |")
        lines.append("|---|" + "---|" * len(attacks))
        for n, e in entries.items():
            agg = e["aggregates"]
            cells = [
                f"{_fmt(agg.get(f'mia_{a}'))} / {_fmt(agg.get('privleak' if a == 'min_k' else f'privleak_{a}'))}"
                for a in attacks
            ]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines += ["", "AUC: forget labelled 0, holdout 1 (1 = forget set recognisably member-like, 0.5 = "
                  "indistinguishable); privleak: relative AUC gap to the retain model's (0 is ideal).", ""]
    if traj:
        lines += ["## Trajectories", ""]
        if curves:
            lines += ["Curves (every method on the same axes): " + ", ".join(
                f"[{k}](curves/{Path(v).name})" for k, v in curves.items()), ""]  # fmt: skip
        for m, pts in traj.items():
            lines.append(f"### {m}")
            lines.append("")
            lines.append("| step | forget_quality | model_utility | forget_truth_ratio | privleak |")
            lines.append("|---|---|---|---|---|")
            for p in pts:
                lines.append(
                    f"| {p['step']} | {_fmt(p['forget_quality'])} | {_fmt(p['model_utility'])} | "
                    f"{_fmt(p['forget_truth_ratio'])} | {_fmt(p['privleak'])} |"
                )
            lines.append("")
    lines += [
        "Metrics as in open-unlearning. forget_quality: KS-test p-value of forget truth ratios vs the "
        "retain model (higher = closer to never having seen the forget set); model_utility: harmonic "
        "mean of nine retain / real-author / world-fact numbers; privleak: relative Min-40% AUC gap "
        "to the retain model (0 is ideal). Per-sample values: see report.json `per_sample_file`.",
        "",
    ]
    return "\n".join(lines)


def _plot(path: Path, entries: dict, traj: dict, title: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tofu = any(e["benchmark"] == "tofu" for e in entries.values()) or any(
        p.get("model_utility") is not None for pts in traj.values() for p in pts
    )
    if tofu:
        xkey, ykey, log = "model_utility", "forget_quality", True
        xlabel, ylabel = "Model utility  (higher is better →)", "Forget quality, KS p-value  (log, higher is better ↑)"
    else:
        xkey, ykey, log = "retain_knowmem_ROUGE", "forget_knowmem_ROUGE", False
        xlabel, ylabel = "Retain KnowMem ROUGE  (higher is better →)", "Forget KnowMem ROUGE  (lower is better ↓)"

    def y_of(v):
        if v is None:
            return None
        return max(float(v), FQ_FLOOR) if log else float(v)

    fig, ax = plt.subplots(figsize=(7.5, 5.5), dpi=120)
    # Method colours: tab10 without its green and red, which mark the retain and target stars.
    palette = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i not in (2, 3)]

    def cmap(n):
        return palette[n % len(palette)]

    missing = []
    style = {
        "target": dict(marker="*", s=260, color="#d62728", edgecolor="black", zorder=5),
        "retain": dict(marker="*", s=260, color="#2ca02c", edgecolor="black", zorder=5),
    }
    method_color = {}
    for n, (m, _) in enumerate(sorted(traj.items())):
        method_color[m] = cmap(n % 10)
    n_col = len(method_color)
    for name, e in entries.items():
        x, y = e["aggregates"].get(xkey), y_of(e["aggregates"].get(ykey))
        if x is None or y is None:
            missing.append(name)
            continue
        if e["role"] in style:
            label = name if name == e["role"] else f"{name} ({e['role']})"
            ax.scatter([x], [y], label=label, **style[e["role"]])
        else:
            color = method_color.get(name) or cmap(n_col % 10)
            if name not in method_color:
                method_color[name] = color
                n_col += 1
            ax.scatter([x], [y], marker="o", s=70, color=color, edgecolor="black", zorder=4, label=name)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 5), fontsize=8)
    for m, pts in traj.items():
        xy = [(p.get(xkey), y_of(p.get(ykey)), p["step"]) for p in pts]
        xy = [t for t in xy if t[0] is not None and t[1] is not None]
        if not xy:
            missing.append(f"{m} (trajectory)")
            continue
        xs, ys, steps = zip(*xy)
        color = method_color[m]
        ax.plot(xs, ys, "-", color=color, alpha=0.7, lw=1.5, zorder=3,
                label=None if m in entries else m)  # fmt: skip
        ax.scatter(xs, ys, s=18, color=color, zorder=3)
        if len(xs) > 1:
            ax.annotate("", xy=(xs[-1], ys[-1]), xytext=(xs[-2], ys[-2]),
                        arrowprops=dict(arrowstyle="->", color=color, lw=1.5), zorder=3)  # fmt: skip
        ax.annotate(f"step {steps[0]}", (xs[0], ys[0]), textcoords="offset points", xytext=(-10, -12),
                    fontsize=7, color=color)  # fmt: skip
        if len(xs) > 1:
            ax.annotate(f"step {steps[-1]}", (xs[-1], ys[-1]), textcoords="offset points",
                        xytext=(-10, -12), fontsize=7, color=color)  # fmt: skip
    if log:
        ax.set_yscale("log")
        ax.axhline(0.05, color="gray", ls="--", lw=0.8)
        ax.text(ax.get_xlim()[0], 0.05, " p = 0.05", va="bottom", fontsize=7, color="gray")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title or ("TOFU: forget quality vs model utility" if tofu else "MUSE: forget vs retain knowledge"))
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best", framealpha=0.85)
    if missing:
        fig.text(0.01, 0.01, f"not plotted (no {ykey} / {xkey}): " + ", ".join(missing), fontsize=7, color="gray")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
