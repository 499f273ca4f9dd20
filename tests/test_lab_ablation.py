"""The batch-size / lr ablation report (docs/experiments/pretrained.md, "Ablation: batch size and
learning rate"; bvgls_lab.experiments.ablation) on synthetic finished runs of both arms, written with the
runner's own run-directory writers: its numbers against a hand computation, the chosen lrs and
the EDGE flag, the three judged statements both ways, partial data, and `bvgls-lab bench --batch16`."""

import json
import math
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from test_lab_protocols import lab_cli

from bvgls.runner import rundir
from bvgls.runner.rundir import History
from bvgls_lab.experiments import ablation
from bvgls_lab.experiments.protocols import PRETRAINED_BATCH, PRETRAINED_M
from bvgls_lab.experiments.report import t_quantile

REPO = Path(__file__).resolve().parents[1]
GROUPS = ["stem"] + [f"stage{i}" for i in range(1, 8)] + ["final", "head"]
EPOCHS = 3
STEPS = {16: 15, 128: 2}  # per epoch: ceil(233 / batch) on clipart-coarse's pool
FINE, COARSE = ablation.TASKS
SEEDS = (0, 1, 2, 3, 4)
#: full finetuning's test error per seed (batch 16; batch 128 adds 2 points)
FULL = {FINE: [30.0, 32.0, 31.0, 29.0, 33.0], COARSE: [40.0, 42.0, 41.0, 39.0, 43.0]}
SMALL_GAP = [0.5, -0.5, 1.0, -1.0, 0.0]  # bvgls − full: an interval around 0
LARGE_GAP = [8.0, 9.0, 7.0, 10.0, 8.0]  # bvgls − full: an interval well above 0
COARSE_EXTRA = [1.0, 0.0, 2.0, 0.0, 1.0]  # batch 128: clipart-coarse's gap differs from clipart-fine's
L6_GAP = [1.0, 2.0, 1.0, 2.0, 1.0]


def frequencies(strategy: str, epoch: int) -> list[float]:
    if strategy == "full":
        return [1.0] * 10
    if strategy == "L6-10":
        return [0.0] * 5 + [1.0] * 5
    head = 0.3 + 0.1 * epoch  # bvgls: a frequency that changes per epoch (updates are summed epoch by epoch)
    return [0.02] * 8 + [0.84 - head, head]


def write_run(
    root: Path,
    phase: str,
    task: str,
    strategy: str,
    lr: float,
    seed: int,
    batch: int,
    *,
    test_error: float = 50.0,
    val_error: float = 50.0,
    diverged: bool = False,
) -> None:
    """One finished run directory, written as the runner writes it."""
    records = []
    for e in range(1, EPOCHS + 1):
        evaluated = phase == "final" or e == EPOCHS
        records.append(
            {
                "epoch": e,
                "steps": e * STEPS[batch],
                "lr": lr,
                "train_loss": None if diverged else 1.0 / e,
                "test_loss": 1.0 if evaluated else None,
                "test_error": test_error if evaluated else None,
                "val_loss": 1.0 if evaluated else None,
                "val_error": val_error if evaluated else None,
                "train_s": 1.0,
                "eval_s": 0.1,
                "wall_s": 1.1,
                "selection_frequency": frequencies(strategy, e),
                "mean_bvr": None,
                "mean_scale": frequencies(strategy, e),
            }
        )
    config = {"dataset": task, "strategy": strategy, "seed": seed, "lr": lr, "phase": phase, "epochs": EPOCHS}
    history = History(config, GROUPS, GROUPS, records, True, diverged)
    path = root / phase / "runs" / task / strategy / f"lr{lr:g}" / f"seed{seed}"
    path.mkdir(parents=True)
    rundir.write_history(str(path), history)
    rundir.write_metrics(str(path), history)
    rundir.write_result(str(path), history)


def write_arm(root: Path, protocol, errors: dict, chosen: dict, grids: dict, diverged=()) -> Path:
    """A part directory: protocol.json, final runs with ``errors`` per cell and seed at the ``chosen``
    lr, and search runs (seed 0) over ``grids`` with the lowest validation error at the chosen lr."""
    root.mkdir(parents=True)
    (root / "protocol.json").write_text(json.dumps(asdict(protocol), indent=2))
    batch = protocol.batch_size
    for (t, s), per_seed in errors.items():
        for seed, error in zip(protocol.seeds, per_seed):  # the batch-128 arm has fewer final seeds
            write_run(root, "final", t, s, chosen[(t, s)], seed, batch, test_error=error)
    for (t, s), grid in grids.items():
        for lr in grid:
            write_run(
                root,
                "search",
                t,
                s,
                lr,
                0,
                batch,
                diverged=(t, s, lr) in diverged,
                val_error=val_curve(lr, chosen[(t, s)]),
            )
    return root


def val_curve(lr: float, best: float) -> float:
    return 20.0 + 10.0 * abs(math.log10(lr / best))


def arm_errors(gap_of: dict, offset: float) -> dict:
    """Per cell of one arm, test errors per seed: full + offset, bvgls = full + the arm's gap (plus
    COARSE_EXTRA on clipart-coarse at batch 128, offset 2)."""
    errors = {}
    for t in ablation.TASKS:
        full = [x + offset for x in FULL[t]]
        gap = [g + (c if t == COARSE and offset else 0.0) for g, c in zip(gap_of[t], COARSE_EXTRA)]
        errors[(t, "full")] = full
        errors[(t, "bvgls")] = [f + g for f, g in zip(full, gap)]
        errors[(t, "L6-10")] = [f + g for f, g in zip(full, L6_GAP)]
    return errors


B16_GRID = (0.001, 0.003, 0.01, 0.03)
B128_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)


def build(tmp_path: Path, *, needs_steps: bool, bvgls_lr_128: float = 0.3) -> tuple[Path, Path]:
    """Both arms: ``needs_steps`` puts the large bvgls − full gap at batch 128 (else at batch 16).
    Chosen lrs: batch 16 full 0.001 / bvgls 0.003 / L6-10 0.001 (full's grid extended down to
    0.0003); batch 128 full 0.1 / bvgls ``bvgls_lr_128`` on clipart-coarse (0.3 on clipart-fine) /
    L6-10 0.1, but 3.0 -- the ladder's end -- on clipart-fine. Full's lr 1.0 diverged at batch 128."""
    small, large = {t: SMALL_GAP for t in ablation.TASKS}, {t: LARGE_GAP for t in ablation.TASKS}
    b16_lrs = {"full": 0.001, "bvgls": 0.003, "L6-10": 0.001}
    chosen16 = {(t, s): lr for t in ablation.TASKS for s, lr in b16_lrs.items()}
    grids16 = {c: B16_GRID + ((0.0003,) if c[1] == "full" else ()) for c in chosen16}
    a = write_arm(
        tmp_path / "A" / "mobilenet_v2",
        PRETRAINED_M,
        arm_errors(small if needs_steps else large, 0.0),
        chosen16,
        grids16,
    )
    chosen128 = {(t, s): 0.1 for t in ablation.TASKS for s in ablation.ABLATION_STRATEGIES}
    chosen128.update({(FINE, "bvgls"): 0.3, (COARSE, "bvgls"): bvgls_lr_128, (FINE, "L6-10"): 3.0})
    grids128 = {c: B128_GRID + ((3.0,) if c == (FINE, "L6-10") else ()) for c in chosen128}
    b = write_arm(
        tmp_path / "B",
        PRETRAINED_BATCH,
        arm_errors(large if needs_steps else small, 2.0),
        chosen128,
        grids128,
        diverged={(t, "full", 1.0) for t in ablation.TASKS},
    )
    return a.parent, b


def hand_ci(values: list[float]) -> tuple[float, float, float]:
    mean = statistics.fmean(values)
    half = t_quantile(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def gap(errors: dict, t: str, s: str) -> list[float]:
    return [x - f for x, f in zip(errors[(t, s)], errors[(t, "full")])]


def statement(text: str, number: int) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"{number}. "))


# ---------------------------------------------------------------------- the numbers
def test_the_report_s_numbers_match_a_hand_computation(tmp_path):
    a, b = build(tmp_path, needs_steps=True)
    numbers = ablation.write_batch_ablation(a, b)
    text = (b / "ablation.md").read_text()
    e16, e128 = (
        arm_errors({t: SMALL_GAP for t in ablation.TASKS}, 0.0),
        arm_errors({t: LARGE_GAP for t in ablation.TASKS}, 2.0),
    )
    n128 = len(PRETRAINED_BATCH.seeds)
    e128 = {cell: values[:n128] for cell, values in e128.items()}
    assert t_quantile(4) == pytest.approx(2.776, abs=1e-3)
    # test error mean ± std per (task, batch, strategy)
    for (t, s), values in e128.items():
        assert numbers["arms"][128]["test_error"][f"{t} {s}"] == dict(zip(PRETRAINED_BATCH.seeds, values))
    row = next(line for line in text.splitlines() if line.startswith(f"| {COARSE}, batch 128 |"))
    assert f"{statistics.fmean(e128[(COARSE, 'bvgls')]):.2f} ± {statistics.stdev(e128[(COARSE, 'bvgls')]):.2f}" in row
    # bvgls − full at each batch, per task and task-averaged per seed
    for batch, errors in ((16, e16), (128, e128)):
        averaged = [statistics.fmean(v) for v in zip(gap(errors, FINE, "bvgls"), gap(errors, COARSE, "bvgls"))]
        for key, diffs in ((FINE, gap(errors, FINE, "bvgls")), ("average", averaged)):
            got = numbers["versus_full"]["bvgls"][batch][key]
            assert [got["mean"], *got["ci95"]] == pytest.approx(hand_ci(diffs), abs=1e-9)
    # the difference of differences, paired by (task, seed)
    dod = {t: [x - y for x, y in zip(gap(e128, t, "bvgls"), gap(e16, t, "bvgls"))] for t in ablation.TASKS}
    expected = hand_ci([statistics.fmean(v) for v in zip(dod[FINE], dod[COARSE])])
    got = numbers["difference_of_differences"]["bvgls"]["average"]
    assert [got["mean"], *got["ci95"]] == pytest.approx(expected, abs=1e-9) and got["n"] == n128
    assert "{:+.2f} [{:+.2f}, {:+.2f}]".format(*expected) in text
    l6 = numbers["difference_of_differences"]["L6-10"][FINE]  # the same gap at both batches: 0
    assert l6["mean"] == pytest.approx(0.0, abs=1e-9)


def test_chosen_lrs_edge_flag_grid_and_updates_per_group(tmp_path):
    a, b = build(tmp_path, needs_steps=True)
    numbers = ablation.write_batch_ablation(a, b)
    text = (b / "ablation.md").read_text()
    cells = numbers["arms"][128]["cells"]
    assert cells[f"{FINE} L6-10"]["lr"] == 3.0 and cells[f"{FINE} L6-10"]["edge"]
    assert "3 [0.01-0.03-0.1-0.3-1-3] **EDGE**" in text
    assert not cells[f"{FINE} bvgls"]["edge"] and not numbers["arms"][16]["cells"][f"{FINE} full"]["edge"]
    assert numbers["arms"][16]["cells"][f"{FINE} full"]["grid"] == [0.0003, 0.001, 0.003, 0.01, 0.03]
    # validation error over the whole grid: the chosen lr in bold, the diverged run marked
    val = numbers["arms"][128]["val_error"][f"{FINE} full"]
    assert val["0.1"] == 20.0 and val["0.01"] == pytest.approx(30.0) and math.isinf(val["1"])
    full_row = next(line for line in text.splitlines() if line.startswith("| full, batch 128 |"))
    assert "**20.0**" in full_row and "div" in full_row
    assert (b / "figures" / ablation.FIGURE).stat().st_size > 0 and numbers["figure"]
    # updates per group: steps × selection frequency, summed over epochs
    for batch in (16, 128):
        arm = numbers["arms"][batch]["updates"]
        assert arm[f"{FINE} full"]["steps"] == EPOCHS * STEPS[batch]
        assert arm[f"{FINE} full"]["per_group"] == [EPOCHS * STEPS[batch]] * 10
        assert arm[f"{FINE} L6-10"]["per_group"] == [0.0] * 5 + [EPOCHS * STEPS[batch]] * 5
        head = sum(STEPS[batch] * frequencies("bvgls", e)[-1] for e in range(1, EPOCHS + 1))
        assert arm[f"{FINE} bvgls"]["per_group"][-1] == pytest.approx(head)
        assert arm[f"{FINE} bvgls"]["per_group"][0] == pytest.approx(0.02 * EPOCHS * STEPS[batch])


def test_the_three_statements_hold_when_bvgls_needs_steps_and_a_larger_lr(tmp_path):
    a, b = build(tmp_path, needs_steps=True)
    numbers = ablation.write_batch_ablation(a, b)
    text = (b / "ablation.md").read_text()
    verdicts = numbers["statements"]
    assert verdicts["steps"]["verdict"] == "holds"
    assert verdicts["lr"]["verdict"] == "holds"  # ratios of exactly 3 (0.003 / 0.001, 0.3 / 0.1) count
    assert verdicts["competitive"]["per_batch"] == {16: "holds", 128: "does not hold"}
    assert verdicts["competitive"]["verdict"] == "competitive at batch 16"
    assert "**Holds**" in statement(text, 1) and "**Holds**" in statement(text, 2)
    assert "**Competitive at batch 16**" in statement(text, 3)
    assert "Every cell has all its final runs." in text and "Preliminary" not in text


def test_the_statements_do_not_hold_the_other_way_round(tmp_path):
    a, b = build(tmp_path, needs_steps=False, bvgls_lr_128=0.1)
    verdicts = ablation.write_batch_ablation(a, b)["statements"]
    assert verdicts["steps"]["verdict"] == "does not hold"
    assert (
        verdicts["lr"]["verdict"] == "does not hold"
        and f"{COARSE}, batch 128: 0.1 / 0.1 = 1x" in verdicts["lr"]["detail"]
    )
    assert verdicts["competitive"]["per_batch"] == {16: "does not hold", 128: "holds"}
    text = (b / "ablation.md").read_text()
    assert "**Does not hold**" in statement(text, 1) and "**Does not hold**" in statement(text, 2)


def test_the_statements_are_worded_as_the_frozen_protocol_words_them():
    doc = " ".join((REPO / "docs" / "experiments" / "pretrained.md").read_text().split())
    section = doc[doc.index("## Ablation: batch size and learning rate") : doc.index("## Time budget")]
    for text in ablation.STATEMENTS.values():
        assert text in section, text


# ---------------------------------------------------------------------- partial data
def test_a_batch_128_arm_cut_short_is_reported_as_far_as_it_ran(tmp_path):
    a, _ = build(tmp_path / "full", needs_steps=True)
    errors = {(FINE, "full"): FULL[FINE][:2], (FINE, "bvgls"): [x + 8 for x in FULL[FINE][:2]]}
    chosen = {(FINE, "full"): 0.1, (FINE, "bvgls"): 0.3, (COARSE, "full"): 0.1}
    b = write_arm(
        tmp_path / "B", PRETRAINED_BATCH, errors, chosen, {(FINE, "full"): B128_GRID, (COARSE, "full"): B128_GRID[:2]}
    )
    numbers = ablation.write_batch_ablation(a, b)
    text = (b / "ablation.md").read_text()
    assert f"- {FINE} / bvgls at batch 128: 2 of 3 final runs" in text
    assert f"- {COARSE} / L6-10 at batch 128: 0 of 3 final runs" in text and "**Preliminary**" in text
    assert len(numbers["incomplete"]) == 6  # every batch-128 cell
    assert numbers["versus_full"]["bvgls"][128][FINE]["mean"] == pytest.approx(8.0)
    assert "average" not in numbers["versus_full"]["bvgls"][128]  # needs both tasks
    verdicts = numbers["statements"]
    assert verdicts["steps"]["verdict"] == "not judged"
    assert (
        verdicts["lr"]["verdict"] == "not judged"
        and f"no chosen lr yet for {COARSE} at batch 128" in verdicts["lr"]["detail"]
    )
    assert verdicts["competitive"]["per_batch"] == {16: "holds", 128: "not judged"}
    assert verdicts["competitive"]["verdict"] == "competitive at batch 16 (batch 128 not judged)"


def test_an_empty_arm_and_no_matplotlib_still_give_a_report(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    a, _ = build(tmp_path / "full", needs_steps=True)
    b = write_arm(tmp_path / "B", PRETRAINED_BATCH, {}, {}, {})
    numbers = ablation.write_batch_ablation(a, b, tmp_path / "out" / "ablation.md")
    text = (tmp_path / "out" / "ablation.md").read_text()
    assert numbers["figure"] is None and "No figure: matplotlib is not installed" in text
    assert (tmp_path / "out" / "ablation.json").is_file()
    assert numbers["statements"]["steps"]["verdict"] == numbers["statements"]["lr"]["verdict"] == "not judged"
    assert numbers["statements"]["competitive"]["per_batch"] == {16: "holds", 128: "not judged"}


def test_the_arms_are_located_and_a_wrong_directory_refused(tmp_path):
    a, b = build(tmp_path, needs_steps=True)
    assert ablation.locate_part(a, *ablation.B16_PART) == (a / "mobilenet_v2", PRETRAINED_M)
    assert ablation.locate_part(a / "mobilenet_v2", *ablation.B16_PART)[0] == a / "mobilenet_v2"
    with pytest.raises(
        ValueError,
        match=r"another protocol than part mobilenet_v2 of `pretrained` \(differs in "
        r"batch_size, lr_ladder, lrs, seeds, strategies\)",
    ):
        ablation.locate_part(b, *ablation.B16_PART)
    with pytest.raises(ValueError, match="holds no `pretrained-batch` benchmark"):
        ablation.write_batch_ablation(a, tmp_path)
    with pytest.raises(ValueError, match="is not a directory"):
        ablation.write_batch_ablation(tmp_path / "nowhere", b)


# ---------------------------------------------------------------------- the command
def test_cli_writes_the_ablation_report_and_refuses_a_bad_batch16(tmp_path):
    a, b = build(tmp_path, needs_steps=True)
    res = lab_cli("bench", "--protocol", "pretrained-batch", "--out", b, "--report-only", "--batch16", a)
    assert res.returncode == 0, res.stderr
    assert f"batch-size ablation report: {b / 'ablation.md'}" in res.stdout
    assert "**Competitive at batch 16**" in (b / "ablation.md").read_text() and (b / "report.md").is_file()
    for args, message in (
        (
            ("--protocol", "pretrained-batch", "--out", tmp_path / "new", "--batch16", tmp_path / "nowhere"),
            "is not a directory",
        ),
        (
            ("--protocol", "pretrained-batch", "--out", tmp_path / "new", "--batch16", b),
            "another protocol than part mobilenet_v2 of `pretrained`",
        ),
        (
            ("--protocol", "pretrained", "--out", tmp_path / "new", "--batch16", a),
            "--batch16 goes with --protocol pretrained-batch",
        ),
    ):
        res = lab_cli("bench", *args)
        assert res.returncode == 2 and res.stderr.startswith("error: ") and message in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "new").exists()
