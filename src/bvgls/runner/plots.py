"""Figures for finished (or running) runs, as PNG files; matplotlib's Agg canvas, no pyplot state.

- (B) ``loss.png``: train loss, test loss and test error per epoch, one line per run
  (e.g. BVG-LS against full finetuning).
- (C) ``selection.png``: fraction of the steps of each epoch in which each group was updated,
  as a heatmap (groups x epochs). For per-tensor strategies (BVG-TS) the rows are layer groups
  and the value is the mean over their tensors; for graded strategies (every group steps, with
  different lr multipliers, e.g. llrd) the value is the mean multiplier.
- ``bvr.png``: mean bias-variance ratio of each group per epoch (strategies that compute it).

:func:`plot_paths` accepts run directories and ``bvgls compare`` output directories.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from .rundir import History, prepare_out_dir

DPI = 100
LOSS_FIGSIZE = (13.5, 4.0)  # inches; PNGs are LOSS_FIGSIZE * DPI pixels
SELECTION_WIDTH = 10.0


def new_figure(size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str) -> str:
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=DPI)
    os.replace(tmp, path)
    return path


def selection_figsize(num_groups: int) -> tuple[float, float]:
    return (SELECTION_WIDTH, max(3.0, 0.32 * num_groups + 1.6))


def run_label(history: History) -> str:
    cfg = history.config
    return str(cfg.get("strategy", "run"))


def plot_losses(runs: Sequence[tuple[str, History]], path: str, title: str = "") -> str:
    """(B): train loss, test loss (validation dashed) and test error per epoch for each run."""
    fig = new_figure(LOSS_FIGSIZE)
    axes = fig.subplots(1, 3)
    panels = [("train_loss", "train loss"), ("test_loss", "test loss"), ("test_error", "test error (%)")]
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for (label, hist), color in zip(runs, colors):
        emph = 2.4 if label.startswith("bvgls") else 1.5
        for ax, (key, _) in zip(axes, panels):
            pts = [(r["epoch"], r[key]) for r in hist.epochs if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, lw=emph, color=color, label=label)
            vkey = key.replace("test", "val")
            vpts = [(r["epoch"], r[vkey]) for r in hist.epochs if key != "train_loss" and r.get(vkey) is not None]
            if vpts:
                ax.plot(*zip(*vpts), ls="--", lw=1.0, color=color, label=f"{label} (val)")
    for ax, (_, name) in zip(axes, panels):
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[1].legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def _selection_matrix(history: History) -> tuple[list[str], list[list[float]], str]:
    layer = [r.get("layer_selection_frequency") for r in history.epochs]
    if history.epochs and all(v is not None for v in layer):
        rows = history.layer_group_names
        cols = layer
        what = "mean over the group's tensors of the fraction of steps updated"
    elif (
        history.epochs
        and all(r.get("mean_scale") is not None for r in history.epochs)
        and any(
            any(abs(a - b) > 1e-12 for a, b in zip(r["mean_scale"], r["selection_frequency"])) for r in history.epochs
        )
    ):
        rows = history.group_names  # graded strategy: every group moves every step, at different rates
        cols = [r["mean_scale"] for r in history.epochs]
        what = "mean learning-rate multiplier"
    else:
        rows = history.group_names
        cols = [r["selection_frequency"] for r in history.epochs]
        what = "fraction of steps updated"
    matrix = [[col[g] for col in cols] for g in range(len(rows))]
    return rows, matrix, what


def plot_selection(history: History, path: str, title: str = "") -> str:
    """(C): heatmap of each group's selection frequency over epochs."""
    import numpy as np

    names, matrix, what = _selection_matrix(history)
    data = np.array(matrix, dtype=float) if matrix else np.zeros((0, 0))
    fig = new_figure(selection_figsize(len(names)))
    ax = fig.subplots()
    epochs = [r["epoch"] for r in history.epochs]
    if data.size:
        vmax = max(float(data.max()), 1e-9)
        im = ax.imshow(
            data,
            aspect="auto",
            cmap="viridis",
            vmin=0.0,
            vmax=vmax,
            interpolation="nearest",
            extent=(epochs[0] - 0.5, epochs[-1] + 0.5, len(names) - 0.5, -0.5),
        )
        fig.colorbar(im, ax=ax, label=what if len(what) < 30 else "fraction of steps updated")
        if len(epochs) <= 20 and len(names) <= 20:
            for gi in range(len(names)):
                for ei, ep in enumerate(epochs):
                    v = data[gi, ei]
                    ax.text(
                        ep,
                        gi,
                        f"{v:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if v < 0.6 * vmax else "black",
                    )
    ax.set_yticks(range(len(names)), [f"{i + 1} {n}" for i, n in enumerate(names)], fontsize=8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("group")
    if epochs:
        step = max(1, math.ceil(len(epochs) / 25))
        ax.set_xticks(epochs[::step])
    ax.set_title(title or f"selection frequency ({what})", fontsize=10)
    return save_figure(fig, path)


def plot_bvr(history: History, path: str, title: str = "") -> str | None:
    """Mean bias-variance ratio per group and epoch (log scale); None if the run has none."""
    if not history.epochs or history.epochs[0].get("mean_bvr") is None or len(history.group_names) > 40:
        return None
    fig = new_figure(LOSS_FIGSIZE)
    ax = fig.subplots()
    epochs = [r["epoch"] for r in history.epochs]
    for g, name in enumerate(history.group_names):
        pts = [
            (e, r["mean_bvr"][g])
            for e, r in zip(epochs, history.epochs)
            if r["mean_bvr"][g] is not None and r["mean_bvr"][g] > 0
        ]
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=3, label=f"{g + 1} {name}", color=f"C{g % 10}")
    ax.set_yscale("log")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean BVR over the epoch's steps")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2 if len(history.group_names) > 8 else 1)
    ax.set_title(title or "bias-variance ratio per group")
    return save_figure(fig, path)


def plot_run(run_dir: str) -> list[str]:
    """loss.png, selection.png and (where recorded) bvr.png in ``run_dir``."""
    hist = History.load(run_dir)
    if not hist.epochs:
        raise ValueError(f"{run_dir!r} has no finished epoch to plot yet")
    label = run_label(hist)
    data = hist.config.get("dataset", "")
    title = f"{label} on {data}" if data else label
    out = [
        plot_losses([(label, hist)], os.path.join(run_dir, "loss.png"), title),
        plot_selection(hist, os.path.join(run_dir, "selection.png"), f"selection frequency: {title}"),
    ]
    bvr = plot_bvr(hist, os.path.join(run_dir, "bvr.png"), f"mean BVR per group: {title}")
    return out + ([bvr] if bvr else [])


def _is_selective(hist: History) -> bool:
    return any(0.0 < f < 1.0 for r in hist.epochs for f in r["selection_frequency"])


def plot_compare(out_dir: str) -> list[str]:
    """Per dataset: loss curves of every strategy at its reported lr (first seed), and a selection
    heatmap per selective strategy; written to ``out_dir/plots``."""
    from .results import choose_lrs, collect_results, mark_reported, slug

    rows = collect_results(out_dir)
    rows = mark_reported(rows, choose_lrs(rows))
    rows = [r for r in rows if r["chosen"]]
    if not rows:
        raise ValueError(f"{out_dir!r} has no finished runs to plot yet")
    plots = os.path.join(out_dir, "plots")
    os.makedirs(plots, exist_ok=True)
    written = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        first_seed = min(r["seed"] for r in rows if r["dataset"] == dataset)
        runs = []
        for r in rows:
            if r["dataset"] == dataset and r["seed"] == first_seed:
                hist = History.load(os.path.join(out_dir, r["run_dir"]))
                runs.append((r["strategy"], hist))
                if _is_selective(hist):
                    written.append(
                        plot_selection(
                            hist,
                            os.path.join(plots, f"selection_{slug(dataset)}_{slug(r['strategy'])}.png"),
                            f"selection frequency: {r['strategy']} on {dataset} (seed {first_seed})",
                        )
                    )
        runs.sort(key=lambda x: (not x[0].startswith("bvgls"), x[0]))
        written.append(
            plot_losses(runs, os.path.join(plots, f"loss_{slug(dataset)}.png"), f"{dataset} (seed {first_seed})")
        )
    return written


def plot_paths(paths: Sequence[str], out: str | None = None) -> list[str]:
    """Plot run directories and compare directories.

    Each run directory gets its own figures; with several run directories a comparison
    ``loss_compare.png`` goes to ``out`` (default: the first run's directory)."""
    if not paths:
        raise ValueError("give at least one run directory or compare output directory")
    if out is not None:
        prepare_out_dir(out)
    written, runs = [], []
    for path in paths:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path!r} is not a directory")
        if os.path.isdir(os.path.join(path, "runs")) and not os.path.isfile(os.path.join(path, "history.json")):
            written += plot_compare(path)
            continue
        written += plot_run(path)
        runs.append(path)
    if len(runs) > 1:
        histories = [History.load(p) for p in runs]
        labels = [run_label(h) for h in histories]
        if len(set(labels)) < len(labels):
            labels = [f"{lab} ({os.path.basename(os.path.normpath(p))})" for lab, p in zip(labels, runs)]
        target = out or runs[0]
        written.append(
            plot_losses(list(zip(labels, histories)), os.path.join(target, "loss_compare.png"), " vs ".join(labels))
        )
    return written


def plot_lr_sensitivity(sens, path: str, title: str = "") -> str:
    """Test error (solid) and validation error (dashed) against lr, log scale, one line per strategy,
    mean over seeds with ± one standard deviation as error bars; one panel per dataset.
    ``sens``: :func:`bvgls.runner.lrsens.lr_sensitivity`'s result."""
    datasets = list(dict.fromkeys(d for d, _ in sens))
    strategies = list(dict.fromkeys(s for _, s in sens))
    fig = new_figure((max(8.0, 4.8 * len(datasets)), 4.6))
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, dataset in zip(axes, datasets):
        for k, strategy in enumerate(strategies):
            points = sens.get((dataset, strategy), [])
            for key, style in (("test", "-"), ("val", "--")):
                xs = [p.lr for p in points if getattr(p, key) is not None]
                spreads = [getattr(p, key) for p in points if getattr(p, key) is not None]
                if not xs:
                    continue
                errs = [0.0 if math.isnan(s.std) else s.std for s in spreads]
                ax.errorbar(
                    xs,
                    [s.mean for s in spreads],
                    yerr=errs,
                    color=f"C{k % 10}",
                    linestyle=style,
                    marker="o" if key == "test" else None,
                    markersize=4,
                    capsize=2,
                    linewidth=2.2 if strategy.startswith("bvgls") else 1.4,
                    label=strategy if key == "test" else None,
                    alpha=1.0 if key == "test" else 0.6,
                )
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("error (%): test solid, validation dashed")
        ax.set_title(dataset)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def write_lr_sensitivity(rows, fig_dir: str, title: str = "") -> str | None:
    """``fig_dir/lr_sensitivity.png`` from ``results.csv``-style rows when some cell tried more than
    one lr (else None, nothing written)."""
    from .lrsens import FIGURE_NAME, lr_sensitivity, several_lrs

    sens = lr_sensitivity(rows)
    if not several_lrs(sens):
        return None
    os.makedirs(fig_dir, exist_ok=True)
    return plot_lr_sensitivity(
        sens,
        os.path.join(fig_dir, FIGURE_NAME),
        title or "test and validation error against lr (mean ± std over seeds)",
    )
