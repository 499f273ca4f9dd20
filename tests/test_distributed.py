"""BVG-LS under torch.distributed: 2 CPU processes (gloo), DDP and FSDP2, against one process.

One spawn runs both modes (process start-up dominates the cost); every rank writes its
per-step selections and ratios to a JSON file that the tests compare with a
single-process run on the concatenated batch.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  before init_process_group, or the gloo group outlives destroy (see the example)
import torch.multiprocessing as mp
from tolerances import assert_ratios_match, clear_top_k
from torch import nn

import bvgls
from bvgls import distributed as bdist

WORLD = 2
STEPS = 6
PER_RANK = 4
REL_TOL = 1e-4


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    )


def global_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(WORLD * PER_RANK, 6, generator=g), torch.randint(0, 3, (WORLD * PER_RANK,), generator=g)


def train(model, strategy, rows):
    """STEPS steps on rows ``rows`` of each global batch; per-step selections and ratios."""
    records = []
    for step in range(STEPS):
        x, y = global_batch(step)
        loss = nn.functional.cross_entropy(model(x[rows]), y[rows])
        loss.backward()
        strategy.step()
        strategy.zero_grad()
        records.append({"selected": list(strategy.selected), "ratios": strategy.ratios.tolist()})
    return records


def make_strategy(model):
    groups = bvgls.layer_groups(model)
    opt = torch.optim.SGD(groups.param_groups(), lr=0.2, momentum=0.9)
    return bvgls.BVGLS(opt, k=1, groups=groups)


def _worker(rank, store_path, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    try:
        result = _run_all_modes(rank)  # returns: its models, strategies and meshes can be freed
        dist.barrier()
    finally:
        bdist.shutdown()
    result["gloo_threads_after_shutdown"] = gloo_threads()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def _run_all_modes(rank):
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    result = {}

    # DDP: gradients are averaged before the step; nothing else is needed
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    strategy = make_strategy(model)
    mode = bdist.setup(strategy, verify_every=1)
    result["ddp"] = {
        "mode": mode,
        "steps": train(ddp, strategy, rows),
        "params": [p.detach().tolist() for p in model.parameters()],
    }
    # the check must be able to fail: make this rank's last selection differ
    strategy.scales = [float(rank == i) for i in range(strategy.num_groups)]
    try:
        bdist.assert_same_selection(strategy)
        result["mismatch_detected"] = False
    except RuntimeError as e:
        result["mismatch_detected"] = "ranks selected different groups" in str(e)

    # FSDP2: each rank holds a shard of every gradient; sums are all-reduced
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    strategy = make_strategy(model)
    mode = bdist.setup(strategy, verify_every=1)
    calls = []
    reduce = strategy.reduce_sums

    def counting_reduce(bias, v_sum):
        calls.append(bias.numel() + v_sum.numel())
        return reduce(bias, v_sum)

    strategy.reduce_sums = counting_reduce
    result["fsdp"] = {
        "mode": mode,
        "steps": train(model, strategy, rows),
        "params": [p.full_tensor().detach().tolist() for p in model.parameters()],
        "reduce_calls": calls,
        "local_numel": sum(p.to_local().numel() for p in model.parameters()),
    }
    # a rank's state_dict (its shard of the EMAs) loads back into a strategy on the same shards
    restored = make_strategy(model)
    restored.load_state_dict(strategy.state_dict())
    result["fsdp"]["state_roundtrip"] = all(torch.equal(a, b) for a, b in zip(restored._m, strategy._m))
    restored.remove()

    # FSDP1 flattens whole units: rejected with a clear error rather than computing partial sums
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = make_model()
    fsdp1 = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    opt = torch.optim.SGD(fsdp1.parameters(), lr=0.1)
    try:
        bdist.setup(bvgls.BVGLS(opt, groups=bvgls.layer_groups(model)), modules=[fsdp1])
        result["fsdp1_rejected"] = False
    except ValueError as e:
        result["fsdp1_rejected"] = "FSDP1" in str(e)
    return result


def gloo_threads():
    """Names of this process's gloo threads (Linux), or None where threads cannot be listed."""
    if not os.path.isdir("/proc/self/task"):
        return None
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return [name for name in names if "gloo" in name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    model = make_model()
    reference = {
        "steps": train(model, make_strategy(model), slice(None)),
        "params": [p.detach().tolist() for p in model.parameters()],
    }
    return ranks, reference


def max_rel_diff(a, b):
    worst = 0.0
    for x, y in zip(a, b):
        assert math.isfinite(x) and math.isfinite(y)
        worst = max(worst, abs(x - y) / max(abs(y), 1e-300))
    return worst


def clear_bias_winner(step1_ratios):
    """Step 1's top group when it leads by more than float32 noise in the bias (ratios = bias / eps)."""
    top, second = sorted(range(len(step1_ratios)), key=lambda i: -step1_ratios[i])[:2]
    return [top] if step1_ratios[top] > step1_ratios[second] * (1 + 1e-5) else None


def flat(nested):
    if isinstance(nested, list):
        return [v for item in nested for v in flat(item)]
    return [nested]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_ranks_agree_and_match_single_process(runs, mode):
    ranks, reference = runs
    assert [r[mode]["mode"] for r in ranks] == [mode] * WORLD
    ref_selected = [s["selected"] for s in reference["steps"]]
    assert len(set(map(tuple, ref_selected))) > 1, "the reference run should switch groups to make this a test"
    # the ranks sum their gradients in another order than one process: selections can be compared
    # exactly only because no step of this data is a near-tie (step 1: variance 0, ratio = bias / eps)
    assert clear_bias_winner(reference["steps"][0]["ratios"]) == ref_selected[0]
    assert all(clear_top_k(s["ratios"]) == s["selected"] for s in reference["steps"][1:])
    for r in ranks:
        assert [s["selected"] for s in r[mode]["steps"]] == ref_selected
        first, *later = zip(r[mode]["steps"], reference["steps"])
        assert max_rel_diff(first[0]["ratios"], first[1]["ratios"]) < REL_TOL
        for t, (got, want) in enumerate(later, start=2):
            assert_ratios_match(got["ratios"], want["ratios"], f"{mode} step {t}")
        # the models trained alike too
        for got, want in zip(r[mode]["params"], reference["params"]):
            assert torch.allclose(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-6)


def test_fsdp_reduces_once_per_step_with_2L_values(runs):
    ranks, reference = runs
    num_groups = len(reference["steps"][0]["ratios"])
    total = sum(p.numel() for p in make_model().parameters())
    for r in ranks:
        assert r["fsdp"]["reduce_calls"] == [2 * num_groups] * STEPS
        assert r["fsdp"]["local_numel"] < total  # the gradients really were sharded
    assert sum(r["fsdp"]["local_numel"] for r in ranks) == total


def test_shutdown_frees_the_process_groups_fsdp2_meshes_keep(runs):
    # destroy_process_group alone leaves the gloo group (and its threads) alive here: the
    # FSDP2 mesh holds it and torch's DTensor caches hold the mesh; at exit those threads
    # abort the process now and then ("terminate called without an active exception")
    ranks, _ = runs
    if ranks[0]["gloo_threads_after_shutdown"] is None:
        pytest.skip("threads can only be listed on Linux")
    assert [r["gloo_threads_after_shutdown"] for r in ranks] == [[]] * WORLD


def test_shutdown_outside_distributed_is_a_no_op():
    bdist.shutdown()
    assert not dist.is_initialized()


def test_selection_check_detects_disagreement(runs):
    ranks, _ = runs
    assert all(r["mismatch_detected"] for r in ranks)


def test_fsdp_state_dict_roundtrip_and_fsdp1_rejected(runs):
    ranks, _ = runs
    assert all(r["fsdp"]["state_roundtrip"] for r in ranks)
    assert all(r["fsdp1_rejected"] for r in ranks)


EXAMPLE_RUNS = 3  # per mode; the abort at exit it guards against came in about half the runs


def start_example(*args):
    script = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "ddp_finetune.py")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            script,
            "--epochs",
            "1",
            "--pretrain-epochs",
            "1",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_example_script_under_torchrun_runs_and_exits_cleanly():
    pytest.importorskip("sklearn")
    for run in range(EXAMPLE_RUNS):
        procs = {"ddp": start_example(), "fsdp": start_example("--fsdp")}  # two at a time: start-up dominates
        for mode, proc in procs.items():
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0 and "terminate called" not in err, (mode, run, err[-3000:])
            extra = "one all-reduce of 8 float64 = 64 bytes" if mode == "fsdp" else "none beyond the data-parallel"
            assert f"2 processes, {mode}, strategy bvgls; extra communication: {extra}" in out
            assert "epoch 1: train loss" in out
            assert "all 2 ranks selected the same groups in all 10 steps" in out


def test_setup_outside_distributed_is_a_no_op():
    model = make_model()
    strategy = make_strategy(model)
    assert bdist.setup(strategy) == "single"
    assert strategy.reduce_sums is None
    assert bdist.sharding_groups(strategy) is None
    with pytest.raises(RuntimeError, match="not initialized"):
        bdist.shard_statistics(strategy)
    with pytest.raises(RuntimeError, match="not initialized"):
        bdist.assert_same_selection(strategy)
