"""The placement benchmark harness on a tiny trace it writes itself (no /work/shared needed)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from agent import placement
from benchmarks import placement as bench
from benchmarks.placement_baselines import (
    BestFit,
    FragmentationGradientDescent,
    GpuPacking,
    typical_mix,
)
from benchmarks.placement_sim import (
    MILLI,
    Cluster,
    NodeSpec,
    Replay,
    Task,
    allocation_curve,
    arrival_order,
    gpu_capacity,
    load_nodes,
    load_tasks,
)

NODES_CSV = """sn,cpu_milli,memory_mib,gpu,model
node-0,32000,131072,4,V100
node-1,32000,131072,4,V100
node-2,16000,65536,2,T4
node-3,64000,262144,8,A100
node-4,8000,32768,0,
"""

PODS_CSV = """name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,deletion_time,scheduled_time
p0,4000,8192,1,500,,LS,Running,0,1,0
p1,4000,8192,1,500,,LS,Running,0,1,0
p2,2000,4096,1,250,,LS,Running,0,1,0
p3,8000,16384,1,1000,,LS,Running,0,1,0
p4,8000,16384,2,1000,,LS,Running,0,1,0
p5,2000,4096,0,0,,BE,Running,0,1,0
p6,3000,8192,1,810,V100|A100,LS,Running,0,1,0
p7,16000,65536,4,1000,,LS,Running,0,1,0
p8,4000,8192,1,470,,LS,Running,0,1,0
p9,1000,2048,1,160,T4,LS,Running,0,1,0
"""


@pytest.fixture
def trace(tmp_path: Path) -> tuple[Path, Path]:
    nodes = tmp_path / "nodes.csv"
    pods = tmp_path / "pods.csv"
    nodes.write_text(NODES_CSV)
    pods.write_text(PODS_CSV)
    return nodes, pods


def test_loading_maps_the_trace_columns(trace: tuple[Path, Path]) -> None:
    nodes = load_nodes(trace[0])
    tasks = load_tasks(trace[1])
    assert nodes[4] == NodeSpec("node-4", 8000, 32768, 0, "")
    assert gpu_capacity(nodes) == 18 * MILLI
    assert tasks[6] == Task(3000, 8192, 1, 810, frozenset({"V100", "A100"}))
    assert tasks[5].gpu_total == 0 and tasks[5].affinity == "no-gpu"
    assert tasks[4].affinity == "2-gpu" and not tasks[4].shared
    assert tasks[0].affinity == "share-gpu" and tasks[0].shared


def test_trace_tasks_become_agent_requests() -> None:
    assert bench.to_request(Task(4000, 8192, 1, 470)) == placement.Request(
        placement.Demand(470, 47), cpu_milli=4000, memory_mib=8192
    )
    eight = bench.to_request(Task(64000, 1024, 8, 1000, frozenset({"G2"})))
    assert (eight.count, eight.exclusive, eight.models) == (8, True, frozenset({"g2"}))
    assert bench.to_request(Task(2000, 4096, 0, 0)).count == 0
    assert bench.rounded(Task(1, 1, 1, 470), 10).gpu_milli == 500
    assert bench.rounded(Task(1, 1, 1, 950), 10) == Task(1, 1, 1, 1000)  # a whole card now
    assert bench.rounded(Task(1, 1, 1, 470), 1).gpu_milli == 470


def test_arrival_protocol_inflates_to_the_target(trace: tuple[Path, Path]) -> None:
    nodes, tasks = load_nodes(trace[0]), load_tasks(trace[1])
    cap = gpu_capacity(nodes)
    order = arrival_order(tasks, cap, seed=7)
    total = sum(t.gpu_total for t in order)
    assert total <= 1.3 * cap
    assert sorted(order[: len(tasks)], key=repr) == sorted(tasks, key=repr)  # a permutation
    assert order == arrival_order(tasks, cap, seed=7)
    assert order != arrival_order(tasks, cap, seed=8)
    # a file that already asks for more than the target is cut, never inflated
    cut = arrival_order(tasks * 10, cap, seed=7)
    assert sum(t.gpu_total for t in cut) <= 1.3 * cap < sum(t.gpu_total for t in tasks * 10)


def test_engine_refuses_to_over_commit() -> None:
    cluster = Cluster([NodeSpec("n", 8000, 8192, 1, "A")], track_affinity=False)
    cluster.apply(0, Task(1000, 1024, 1, 600), (0,))
    with pytest.raises(ValueError, match="over-commit"):
        cluster.apply(0, Task(1000, 1024, 1, 500), (0,))
    with pytest.raises(ValueError, match="over-commit"):
        cluster.apply(0, Task(9000, 1024, 0, 0), ())


def test_rounding_costs_what_it_wastes() -> None:
    nodes = [NodeSpec("n", 64000, 65536, 1, "A")]
    tasks = [Task(1, 1, 1, 470), Task(1, 1, 1, 470), Task(1, 1, 1, 50)]
    exact = bench.replay_agent(nodes, tasks, placement.Placer(), 1)
    assert exact.allocated[-1] == 990 and exact.failed == 0
    coarse = bench.replay_agent(nodes, tasks, placement.Placer(), 10)
    assert coarse.allocated[-1] == 940 and coarse.failed == 1  # 50 % + 50 % leave no room


def test_allocation_curve_averages_tasks_at_each_arrival_percentage() -> None:
    run = Replay(1000, [100, 150, 160, 1000], [100, 100, 160, 900], 3, 1, [])
    curve = allocation_curve(run, max_pct=100)
    assert curve[10] == 10.0
    assert curve[15] == 10.0
    assert curve[16] == 16.0
    assert curve[100] == 90.0
    assert 30 not in curve  # no task arrived near 30 %


def _random_trace(seed: int) -> tuple[list[NodeSpec], list[Task]]:
    rnd = random.Random(seed)
    nodes = [
        NodeSpec(
            f"n{i:02d}",
            rnd.choice([16000, 32000, 96000]),
            262144,
            rnd.choice([1, 2, 4, 8]),
            rnd.choice(["A", "B"]),
        )
        for i in range(12)
    ]
    tasks = []
    for _ in range(150):
        kind = rnd.random()
        cpu, mem = rnd.choice([1000, 4000, 12000]), rnd.choice([2048, 16384, 49152])
        if kind < 0.1:
            tasks.append(Task(cpu, mem, 0, 0))
        elif kind < 0.6:
            spec = rnd.choice([frozenset[str](), frozenset({"A"})])
            tasks.append(Task(cpu, mem, 1, rnd.choice([160, 250, 470, 500, 810]), spec))
        else:
            tasks.append(Task(cpu, mem, rnd.choice([1, 1, 2, 4, 8]), MILLI))
    return nodes, tasks


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_agent_replay_is_the_placer_step_by_step(seed: int) -> None:
    """The harness must pick exactly what a fresh ``Placer`` — the object the core calls —
    picks on the same cluster after the same requests, and never over-commit."""
    nodes, tasks = _random_trace(seed)
    order = arrival_order(tasks, gpu_capacity(nodes), seed=seed)
    run = bench.replay_agent(sorted(nodes, key=lambda n: n.name), order, placement.Placer(), 1)
    assert run.placed > 20 and run.failed > 0
    mirror = Cluster(sorted(nodes, key=lambda n: n.name), track_affinity=False)
    shadow = placement.Placer()
    constrained = 0
    for n, (task, placed) in enumerate(zip(order, run.placements, strict=True)):
        states = [bench.node_state(s, mirror.key_of[i]) for i, s in enumerate(mirror.specs)]
        request = bench.to_request(task)
        constrained += bool(request.models)
        shadow.observe(request)
        if n % bench.SUPPLY_EVERY == 0:
            shadow.set_supply(placement.supply_of(states))
        ranked = shadow.rank_nodes(states, request)
        if placed is None:
            assert ranked == []
            continue
        node, positions = placed
        assert (ranked[0].node, ranked[0].devices) == (
            mirror.specs[node].name,
            tuple(f"{p:02d}" for p in positions),
        )
        mirror.apply(node, task, positions)
    assert constrained > 0


def test_baselines_behave_as_published() -> None:
    spec = NodeSpec("n", 96000, 393216, 8, "G2")
    empty = (0, 96000, 393216, (1000,) * 8, frozenset[str]())
    used = (0, 48000, 393216, (1000,) * 7 + (500,), frozenset[str]())
    half = Task(4000, 1024, 1, 500)
    # GPU packing scores a node with a matching used card above an idle node
    packing = GpuPacking()
    assert packing.evaluate(spec, used, half) < packing.evaluate(spec, empty, half)  # type: ignore[operator]
    # best fit: fuller node first, and the fullest card on it
    best = BestFit().evaluate(spec, used, half)
    assert best is not None and best[1] == (7,)
    # FGD's typical mix covers 95 % of tasks and sums to one
    tasks = [half] * 19 + [Task(8000, 1024, 1, 1000)]
    mix = typical_mix(tasks)
    assert sum(m[4] for m in mix) == pytest.approx(1.0)
    assert FragmentationGradientDescent(mix).evaluate(spec, used, half) is not None


@pytest.mark.parametrize("policy", bench.POLICY_NAMES)
def test_every_policy_reports(trace: tuple[Path, Path], policy: str) -> None:
    result = bench.benchmark(trace[0], trace[1], policy, [1, 2], step_pct=1, jobs=1)
    assert result["policy"] == policy
    assert result["seeds"] == [1, 2]
    assert 0.0 <= result["unallocated_pct_at_100"] <= 100.0
    assert result["unallocated_pct_sd"] >= 0.0
    assert len(result["unallocated_pct_per_seed"]) == 2
    curve = dict(result["curve"])
    assert all(0.0 <= v <= 100.0 for v in curve.values())
    assert 100 in curve


def test_cli_prints_one_json_object(
    trace: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--nodes", str(trace[0]), "--pods", str(trace[1]), "--policy", "agent"]
    assert bench.main([*args, "--seeds", "42-43", "--jobs", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("policy", "pods_file", "seeds", "unallocated_pct_at_100", "unallocated_pct_sd"):
        assert key in result
    assert result["seeds"] == [42, 43] and result["pods_file"] == "pods.csv"
    assert result["curve"][-1][0] >= 100
    assert bench.main([*args, "--seeds", "5", "--jobs", "1", "--round-step", "10"]) == 0
    assert "unallocated GPU" in capsys.readouterr().out


def test_parse_seeds() -> None:
    assert bench.parse_seeds("42-45") == [42, 43, 44, 45]
    assert bench.parse_seeds("1,3,7-8") == [1, 3, 7, 8]


def test_trace_variants_constrain_and_weigh_as_described(tmp_path: Path) -> None:
    """The held-out-style variants: gpuspecNN constrains NN % of the GPU tasks to model
    groups that could hold them; cpuNNN redraws the CPU-only tasks to NNN % of the CPU."""
    from benchmarks import trace_variants

    rows = [
        {
            "name": f"p{i}",
            "cpu_milli": "4000",
            "memory_mib": "8192",
            "num_gpu": "1",
            "gpu_milli": "500",
            "gpu_spec": "",
        }
        for i in range(80)
    ] + [
        {
            "name": f"c{i}",
            "cpu_milli": "8000",
            "memory_mib": "8192",
            "num_gpu": "0",
            "gpu_milli": "0",
            "gpu_spec": "",
        }
        for i in range(20)
    ]
    nodes = [NodeSpec("a", 64000, 262144, 8, "V100M16"), NodeSpec("b", 64000, 262144, 8, "T4")]
    constrained = trace_variants.gpuspec(rows, nodes, 25, seed=1)
    specs = [r["gpu_spec"] for r in constrained if r["num_gpu"] == "1"]
    assert sum(1 for s in specs if s) == 20  # a quarter of the 80 GPU tasks
    assert {s for s in specs if s} <= {"V100M16|V100M32", "T4"}  # only groups that can hold them
    assert trace_variants.gpuspec(rows, nodes, 25, seed=1) == constrained
    assert trace_variants.gpuspec(rows, nodes, 25, seed=2) != constrained
    heavy = trace_variants.cpu_heavy(rows, 300, seed=1)
    cpu_only = [r for r in heavy if r["num_gpu"] == "0"]
    assert sum(int(r["cpu_milli"]) for r in cpu_only) == 3 * 20 * 8000
    assert len(heavy) - len(cpu_only) == 80  # GPU tasks unchanged
    assert (
        trace_variants.main(
            [
                "--nodes",
                str(_write_nodes(tmp_path, nodes)),
                "--pods",
                str(_write_pods(tmp_path, rows)),
                "--out",
                str(tmp_path / "v"),
                "--gpuspec",
                "10",
                "--cpu",
                "200",
            ]
        )
        == 0
    )
    names = sorted(p.name for p in (tmp_path / "v").iterdir())
    assert names == ["openb_pod_list_cpu200-seed1.csv", "openb_pod_list_gpuspec10-seed1.csv"]
    assert len(load_tasks(tmp_path / "v" / names[1])) == 100


def _write_nodes(tmp: Path, nodes: list[NodeSpec]) -> Path:
    path = tmp / "nodes.csv"
    lines = ["sn,cpu_milli,memory_mib,gpu,model"]
    lines += [f"{n.name},{n.cpu_milli},{n.memory_mib},{n.gpus},{n.model}" for n in nodes]
    path.write_text("\n".join(lines) + "\n")
    return path


def _write_pods(tmp: Path, rows: list[dict[str, str]]) -> Path:
    path = tmp / "pods.csv"
    keys = list(rows[0])
    path.write_text(
        "\n".join([",".join(keys), *(",".join(r[k] for k in keys) for r in rows)]) + "\n"
    )
    return path
