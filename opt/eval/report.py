"""The results of `opt eval` as a person reads them: ``results.json``, a Markdown table
(``results.md``), and a chart (``results.png``) of every prompt's accuracy per task with
the median marked, as in the T0 paper's figures.

matplotlib is imported inside ``chart`` only."""

from __future__ import annotations

import json
from pathlib import Path

from opt.fsutil import atomic_write

RESULTS_JSON, RESULTS_MD, RESULTS_CHART = "results.json", "results.md", "results.png"
SAMPLES_JSONL = "samples.jsonl"  # with --log-samples


def write_results(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write the three files (and ``samples.jsonl`` when the results carry samples) into
    ``out_dir`` (created); returns their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / RESULTS_JSON, "markdown": out / RESULTS_MD, "chart": out / RESULTS_CHART}
    samples = results.get("samples")
    results = {k: v for k, v in results.items() if k != "samples"}
    if samples is not None:  # one line per scored (prompt, example), task by task
        paths["samples"] = out / SAMPLES_JSONL
        lines = [
            json.dumps({"task": task, **row}) for task, rows in samples.items() for row in rows
        ]
        atomic_write(paths["samples"], "".join(line + "\n" for line in lines))
    atomic_write(paths["json"], json.dumps(results, indent=2) + "\n")
    atomic_write(paths["markdown"], markdown(results))
    chart(results, paths["chart"])
    return paths


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def markdown(results: dict) -> str:
    shots = results["shots"]
    lines = [
        f"# opt eval: {results.get('checkpoint', 'model')}",
        "",
        f"Split `{results['split']}`, {shots}-shot, seed {results['seed']}"
        + (f", first {results['limit']} examples per task" if results.get("limit") else "")
        + ". Accuracy in %: `acc` ranks the choices by summed log-likelihood, `acc_norm` by "
        "log-likelihood per character of the choice (as lm-eval). Spread over prompts: "
        "median, interquartile range (q25–q75), min and max (the T0 view).",
        "",
        "| task | prompts | examples | median acc | IQR acc | min | max | median acc_norm | IQR acc_norm |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, task in results["tasks"].items():
        a, n = task["acc"], task["acc_norm"]
        scored = sum(1 for p in task["prompts"] if p["n"])
        if a is None:
            lines.append(f"| {name} | 0 | {task['n_examples']} | – | – | – | – | – | – |")
            continue
        lines.append(
            f"| {name} | {scored} | {task['n_examples']} | {_pct(a['median'])} "
            f"| {_pct(a['q25'])}–{_pct(a['q75'])} | {_pct(a['min'])} | {_pct(a['max'])} "
            f"| {_pct(n['median'])} | {_pct(n['q25'])}–{_pct(n['q75'])} |"
        )
    for name, task in results["tasks"].items():
        lines += [
            "",
            f"## {name}",
            "",
            "| prompt | examples | acc | 95% CI | acc_norm | 95% CI |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for p in task["prompts"]:
            ci = p["acc_ci"] or [None, None]
            ci_n = p["acc_norm_ci"] or [None, None]
            prompt = p["name"].replace("|", "\\|")
            lines.append(
                f"| {prompt} | {p['n']} | {_pct(p['acc'])} | {_pct(ci[0])}–{_pct(ci[1])} "
                f"| {_pct(p['acc_norm'])} | {_pct(ci_n[0])}–{_pct(ci_n[1])} |"
            )
    return "\n".join(lines) + "\n"


def chart(results: dict, path: str | Path, metric: str = "acc") -> None:
    """One column per task: a dot per prompt, a bar at the median, a dashed line at chance
    (a uniform guess over each scored item's choices)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(results["tasks"].items())
    with matplotlib.rc_context(
        {"font.size": 10, "axes.spines.top": False, "axes.spines.right": False}
    ):
        fig = Figure(figsize=(1.6 * max(len(tasks), 2) + 1.5, 4.2), dpi=120)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for x, (_name, task) in enumerate(tasks):
            values = sorted(100 * p[metric] for p in task["prompts"] if p["n"])
            # Equal (within 1.5 points) accuracies side by side: 0, +d, -d, +2d, ...
            xs, ys, run = [], [], 0
            for k, y in enumerate(values):
                run = run + 1 if k and y - values[k - 1] < 1.5 else 0
                xs.append(x + 0.05 * ((run + 1) // 2) * (1 if run % 2 else -1))
                ys.append(y)
            ax.scatter(xs, ys, s=26, color="#1f77b4", alpha=0.75, zorder=3,
                       label="one prompt" if x == 0 else None)  # fmt: skip
            if task[metric] is not None:
                ax.hlines(100 * task[metric]["median"], x - 0.42, x + 0.42, color="#d62728", lw=2.5,
                          zorder=2, label="median over prompts" if x == 0 else None)  # fmt: skip
            if task.get("chance") is not None:
                ax.hlines(100 * task["chance"], x - 0.4, x + 0.4, color="#7f7f7f", lw=1,
                          linestyles="dashed", zorder=2, label="chance" if x == 0 else None)  # fmt: skip
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels(
            [f"{name}\n({sum(1 for p in t['prompts'] if p['n'])} prompts)" for name, t in tasks]
        )
        ax.set_xlim(-0.6, len(tasks) - 0.4)
        ax.set_ylim(0, 100)
        ax.set_ylabel(f"{metric} (%)")
        shots = results["shots"]
        model = "/".join(Path(results.get("checkpoint", "model")).parts[-2:])  # run/step
        ax.set_title(f"{model}: {shots}-shot, split {results['split']}", fontsize=9)
        ax.grid(axis="y", color="#e6e6e6", lw=0.6)
        ax.legend(loc="upper right", fontsize=8, frameon=False)
        fig.tight_layout()
        fig.savefig(path, format="png")
