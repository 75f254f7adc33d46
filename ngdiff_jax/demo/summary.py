"""The study's one-page summary: ``report.md``'s appendix and the console's closing table."""

from __future__ import annotations

from pathlib import Path


def number_text(v) -> str:
    return "–" if v is None else f"{v:.3g}"


def yaml_text(d) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)


def append_markdown(md: Path, summary: dict) -> None:
    lines = ["", "## Run", "", "| check | value | threshold | ok |", "|---|---|---|---|"]
    for c in summary["checks"]:
        ok = "yes" if c["ok"] else "NO"
        lines.append(f"| {c['check']} | {number_text(c['value'])} | {number_text(c['threshold'])} | {ok} |")
    machine = summary["machine"]
    lines += [
        "",
        (f"Total time {summary['total_s']:.0f} s on {machine['cpus']} CPUs "
         f"(load average at the end: {machine.get('load_average_1_5_15')})."),  # fmt: skip
        "",
        "| phase | seconds |",
        "|---|---|",
    ]
    for k, v in summary["phases_s"].items():
        lines.append(f"| {k} | {v:.1f} |")
    for rnd, per in summary["sweep_s"].items():
        for name, v in per.items():
            lines.append(f"| sweep {rnd}: {name} | {v:.1f} |")
    lines.append("")
    md.write_text(md.read_text() + "\n".join(lines))


def print_summary(console, report, checks, summary) -> None:
    from rich.table import Table

    cols = ("forget_quality", "model_utility", "forget_Q_A_ROUGE", "retain_Q_A_ROUGE")
    pct = round(report["level"] * 100)
    which = ("fresh report seeds" if report["reported_round"] == "report" else
             "cross-fitted runs" if report.get("crossfit") else "selection runs")  # fmt: skip
    t = Table(title=f"Selected settings, {which}: mean [{pct}% interval]")
    t.add_column("model")
    t.add_column("setting")
    for c in cols:
        t.add_column(c, justify="right")
    from ngdiff_jax.sweep.report import interval_text, setting_text

    for n, agg in report["references"].items():
        t.add_row(n, "reference", *(number_text(agg.get(c)) for c in cols))
    for n, m in report["methods"].items():
        t.add_row(n, setting_text(m["selected"]), *(interval_text(m["summary"].get(c)) for c in cols))
    console.print(t)
    for c in checks:
        mark = "[green]✓[/]" if c["ok"] else "[red]✗[/]"
        console.print(f"{mark} {c['check']}: {number_text(c['value'])} (threshold {number_text(c['threshold'])})")
    for key, claim in report["claims"].items():
        color = {"supported": "green", "not supported": "red"}.get(claim["verdict"], "yellow")
        console.print(f"[bold]{key}[/]: [{color}]{claim['verdict']}[/] — {claim['claim']}")
        for row in claim["comparisons"]:
            console.print(f"    vs {row['against']}: {row['verdict']} ({row['reason']})")
    phases = ", ".join(f"{k} {v:.0f}s" for k, v in summary["phases_s"].items())
    console.print(f"[bold]total {summary['total_s']:.0f} s[/] ({phases})")
    r = summary["report"]
    console.print(f"report: {r['md']}, {r['tradeoff']}, {r['sensitivity']}")
