"""The benchmark harness runs end to end on a tiny workload (its figures are not asserted)."""

from benchmarks.systems import run_system
from benchmarks.workloads import Workload, make_workload
from conftest import STAGES


def tiny_workload() -> Workload:
    return Workload("tiny", "3 short requests", [[5, 6, 7], [8] * 12, [9, 10]], [4, 2, 6])


def test_every_stage_and_hf_generate_run_a_workload(checkpoints):
    folder = checkpoints["dense"]
    for system in STAGES + ["hf-generate"]:
        result = run_system(system, str(folder), folder, tiny_workload(), "cpu")
        assert result["output_tokens"] == 12 and result["output_tokens_per_s"] > 0


def test_workloads_are_seeded():
    a, b = make_workload("random", "cpu", 1000, seed=1), make_workload("random", "cpu", 1000, seed=1)
    assert a.prompts == b.prompts and a.max_tokens == b.max_tokens
    assert len(make_workload("random", "gpu", 1000).prompts) == 256


def test_kv_memory_report_runs(checkpoints, capsys):
    from benchmarks import kv_memory

    kv_memory.main(["--model", str(checkpoints["dense"])])
    report = capsys.readouterr().out
    assert "stage02_peak_bytes_in_use" in report and "stage04_batching" in report


def test_one_stage_with_different_options_side_by_side(checkpoints):
    folder = checkpoints["dense"]
    result = run_system("stage06_scheduling@schedule_policy=lpm", str(folder), folder, tiny_workload(), "cpu")
    assert result["system"] == "stage06_scheduling@schedule_policy=lpm" and result["output_tokens"] == 12
