"""benchmarks/common.py: every script's results land in benchmarks/results/<script>/ with machine and command."""
from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_results_carry_provenance_and_land_in_the_script_folder(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    import common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    out = common.write_results("/some/where/my_bench.py", {"ratio": 1.5}, "# My bench\n\n| a |\n|---|\n",
                               argv=["--repeats", "3"])
    assert out == tmp_path / "my_bench"
    data = json.loads((out / "results.json").read_text())
    assert data["ratio"] == 1.5
    prov = data["provenance"]
    assert prov["command"] == "python benchmarks/my_bench.py --repeats 3"
    assert prov["machine"]["usable_cores"] >= 1 and "onnxruntime" in prov["machine"]["versions"]
    md = (out / "results.md").read_text()
    assert md.startswith("# My bench") and "## Provenance" in md and "--repeats 3" in md
    sys.modules.pop("common", None)
