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


def test_time_activated_deactivates_every_runner_even_on_failure(monkeypatch):
    import numpy as np
    import pytest

    from sedeploy.backends import Runner

    monkeypatch.syspath_prepend(str(BENCH))
    import common

    class Fake(Runner):
        def __init__(self, fail=False):
            super().__init__(None)
            self.fail, self.calls = fail, 0

        def _activate(self):
            pass

        def _deactivate(self):
            pass

        def _infer(self, x):
            self.calls += 1
            if self.fail:
                raise RuntimeError("engine failed")
            return np.zeros((len(x), 2), np.float32)

    good, bad = Fake(), Fake(fail=True)
    t = common.time_activated({"a": good, "b": Fake()}, np.zeros((2, 3, 4, 4), np.float32), batch_sizes=(1,),
                              warmup=1, repeats=2)
    assert len(t.samples["a"][1]) == 2 and good.calls >= 3 and not good.is_active
    with pytest.raises(RuntimeError, match="engine failed"):
        common.time_activated({"a": good, "b": bad}, np.zeros((2, 3, 4, 4), np.float32), batch_sizes=(1,),
                              warmup=1, repeats=2)
    assert not good.is_active and not bad.is_active


def test_experiment_scripts_are_named_by_their_path_and_write_to_the_shared_results_folder(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    import common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    script = BENCH / "experiments" / "my_experiment.py"
    assert common.provenance(script, ["--x", "1"])["command"] == "python benchmarks/experiments/my_experiment.py --x 1"
    assert common.results_dir(script) == tmp_path / "my_experiment"
    sys.modules.pop("common", None)
