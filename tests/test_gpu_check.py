"""scripts/gpu_check.py, the one-call GPU check, in its CPU dry run (--tiny): the same stages
and code paths on scaled-down shapes, so that the first call on a lent GPU works."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_memory_runs_cover_lora_and_qlora_on_both_shapes_and_offloading():
    gpu_check = load_script()
    runs = {(shape, recipe, tuple(extra)) for shape, recipe, extra in gpu_check.MEMORY_RUNS}
    for shape in ("1b", "8b"):
        assert {(shape, "llama3-8b-lora", ()), (shape, "llama3-8b-qlora", ())} <= runs
    assert ("8b", "llama3-8b-qlora", ("train.offload_activations=true",)) in runs
    assert gpu_check.MEMORY_RUNS[0][:2] == ("8b", "llama3-8b-qlora")  # the target first


def test_a_stage_that_no_longer_fits_the_budget_is_skipped_and_says_so(tmp_path, monkeypatch):
    gpu_check = load_script()
    monkeypatch.setenv("GPU_CHECK_WORK", str(tmp_path / "work"))
    check = gpu_check.Check(tmp_path / "out", budget=5, tiny=True)
    result = check.run("late", [sys.executable, "-c", "print(1)"], limit=60)
    assert not result["ok"] and result["skipped"].startswith("out of time")
    check.stage("late", result)
    saved = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert saved["stages"]["late"]["skipped"].startswith("out of time")
    fits = gpu_check.Check(tmp_path / "out", budget=60, tiny=True).run(
        "quick", [sys.executable, "-c", "print('hello')"], limit=30)
    assert fits["ok"] and fits["tail"] == "hello" and not fits["timed_out"]


@pytest.mark.slow
def test_dry_run_writes_measured_peaks_next_to_the_estimate_and_the_bench(tmp_path):
    """env (versions, both model shapes), the first memory run (8B-shaped QLoRA) and the
    bench with --vs hf,trl: under a minute on an idle 2-core CPU (three fresh processes)."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(out), "--runs", "1",
         "--stages", "env,memory,bench", "--budget", "400"],
        env={**os.environ, "GPU_CHECK_WORK": str(tmp_path / "work")}, cwd=ROOT,
        capture_output=True, text=True, timeout=450)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "gpu-check.json").read_text())
    assert results["tiny"] and results["env"]["versions"]["torch"]
    assert {"env", "memory", "bench"} <= set(results["stages"])
    rows = results["memory"]
    assert [(r["shape"], r["recipe"]) for r in rows] == [
        ("meta-llama/Llama-3.1-8B-Instruct", "llama3-8b-qlora")]
    for row in rows:
        assert row["ok"] and row["measured_peak_bytes"] > 0
        assert row["show_estimate_bf16_gpu"]["total_bytes"] > 0
        assert row["memory"]["estimate"]["parts_bytes"]["activations"] > 0
    assert "| Llama-3.1-8B-Instruct | llama3-8b-qlora | - |" in results["memory_table"]
    bench = results["stages"]["bench"]
    assert bench["ok"] and (out / "bench-1b.json").is_file()
    sides = set(bench["bench"]["sides"])
    assert bench["bench"]["sides"]["peftkit"]["tokens_per_s"] > 0
    if "note" in bench:  # trl refused (not installed): the hf comparison ran instead
        assert "--vs trl was refused" in bench["note"] and sides == {"peftkit", "hf"}
    else:
        assert sides == {"peftkit", "hf", "trl"}
    assert (out / "gpu-check.log").stat().st_size > 0


def test_bench_falls_back_to_hf_alone_when_trl_is_refused(tmp_path, monkeypatch):
    gpu_check = load_script()
    monkeypatch.setenv("GPU_CHECK_WORK", str(tmp_path / "work"))
    check = gpu_check.Check(tmp_path / "out", budget=60, tiny=False)
    check.results["models"] = {"1b": str(tmp_path / "1b")}
    calls = []

    def run(name, argv, limit):
        calls.append(argv[argv.index("--vs") + 1])
        if calls[-1] == "hf,trl":
            return {"ok": False, "rc": 2, "tail": "error: --vs trl: TRL is not installed",
                    "output": "error: --vs trl: TRL is not installed"}
        return {"ok": True, "rc": 0, "tail": "results: ...", "output": ""}

    monkeypatch.setattr(check, "run", run)
    gpu_check.stage_bench(check)
    bench = check.results["stages"]["bench"]
    assert calls == ["hf,trl", "hf"] and bench["ok"]
    assert bench["note"] == "--vs trl was refused: error: --vs trl: TRL is not installed"
