"""benchmarks/gpu_check.py end to end in its CPU quick mode, so that the first GPU run is not its first run."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_check  # noqa: E402


def test_gpu_check_quick_on_the_cpu(tmp_path):
    gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["sections"]) == {"correctness", "layer", "model", "launches"}
    for row in results["sections"]["correctness"]:  # the fused path is as accurate as the reference path
        for kind in ("out", "grad"):
            assert row[f"fused_{kind}_err"] <= 3 * row[f"reference_{kind}_err"] + 1e-6, row
    assert all(row["status"] == "ok" for row in results["sections"]["layer"] + results["sections"]["model"])
    assert all(row["aten_ops"] > 0 for row in results["sections"]["launches"])
    assert "## launches" in (tmp_path / "results.md").read_text()
