"""The lr search shared by compare and the lab: the ladder, extension past an edge, stopping rules."""

from bvgls.runner.lrsearch import LR_LADDER, next_lr, search_lr


# ---------------------------------------------------------------------- lr search
def test_next_lr_steps_beyond_the_edge():
    assert next_lr(0.1, +1) == 0.3 and next_lr(0.01, -1) == 0.003
    assert next_lr(1.0, +1) is None and next_lr(0.001, -1) is None
    assert next_lr(0.05, +1) == 0.1 and next_lr(0.05, -1) == 0.03  # off the ladder: the next value beyond it
    assert all(next_lr(a, +1) == b for a, b in zip(LR_LADDER, LR_LADDER[1:]))


def fake_search(best: float, lrs, *, diverge_above=None, extend=True):
    """search_lr on a validation error that is lowest at ``best`` (log distance)."""
    import math

    ran = []

    def choose(grid):
        errors = {lr: abs(math.log(lr / best)) for lr in grid}
        diverged = {lr for lr in grid if diverge_above is not None and lr > diverge_above}
        for lr in diverged:
            errors[lr] = 99.0
        return min(grid, key=lambda lr: (errors[lr], lr)), diverged

    choice = search_lr(lrs, ran.extend, choose, extend=extend)
    return choice, ran


def test_search_extends_until_the_choice_is_interior():
    choice, ran = fake_search(0.3, [0.01, 0.1])
    assert choice.lr == 0.3 and choice.grid == [0.01, 0.1, 0.3, 1.0] and not choice.edge
    assert ran == [0.01, 0.1, 0.3, 1.0] and choice.stopped == "interior"
    choice, _ = fake_search(0.001, [0.01, 0.03])
    assert choice.lr == 0.001 and choice.edge and choice.stopped == "ladder end"
    choice, ran = fake_search(0.3, [0.01, 0.1], extend=False)
    assert choice.lr == 0.1 and choice.edge and ran == [0.01, 0.1] and choice.stopped == "not extended"


def test_search_stops_when_the_new_lr_diverges():
    choice, ran = fake_search(1.0, [0.03, 0.1], diverge_above=0.1)
    assert ran == [0.03, 0.1, 0.3] and choice.lr == 0.1 and not choice.edge  # 0.3 diverged: 0.1 is interior


def test_compare_extends_the_grid_by_default(image_root, tmp_path, cli):
    args = (
        "compare",
        "--data",
        image_root,
        "--strategies",
        "full",
        "--seeds",
        "0",
        "--epochs",
        "1",
        "--val-fraction",
        "0.3",
        "--model",
        "tiny-resnet",
        "--weights",
        "none",
        "--batch-size",
        "8",
        "--no-progress",
        "--steps-per-epoch",
        "1",
    )
    res = cli(*args, "--lrs", "0.001,0.003", "--out", tmp_path / "a")
    assert res.exit_code == 0, res.output
    from bvgls.runner.grid import read_results

    rows = read_results(tmp_path / "a" / "results.csv")
    tried = sorted({r["lr"] for r in rows})
    chosen = {r["lr"] for r in rows if r["chosen"]}
    assert len(chosen) == 1
    [lr] = chosen
    # the choice is inside what was tried, or at the ladder's end
    assert tried[0] < lr < tried[-1] or lr in (LR_LADDER[0], LR_LADDER[-1])
    assert len(tried) >= 2 and set(tried) <= set(LR_LADDER)
    res = cli(*args, "--lrs", "0.001,0.003", "--out", tmp_path / "b", "--no-extend-lrs")
    assert res.exit_code == 0, res.output
    assert sorted({r["lr"] for r in read_results(tmp_path / "b" / "results.csv")}) == [0.001, 0.003]
