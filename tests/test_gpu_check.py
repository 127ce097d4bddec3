"""tools/gpu_check.py without CUDA: it says which CUDA steps it skipped and why, and exits 0; its 2B plan
step, at a tiny shape on the CPU device, executes a mixed plan end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parent.parent / "tools"


@pytest.fixture
def tools_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TOOLS))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only report")
def test_gpu_check_on_cpu_exits_0_and_says_why_cuda_steps_were_skipped(
        tools_path: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import gpu_check

    report = tmp_path / "r.json"
    assert gpu_check.main(["--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["failed"] == [] and data["plan_2b"] is None
    assert "torch.cuda.is_available() is False" in data["skipped"]["2B placement plan on CUDA"]
    assert "skipped: 2B placement plan on CUDA" in capsys.readouterr().out


def test_the_plan_step_runs_a_mixed_plan_on_the_cpu_device(tools_path: None) -> None:
    from gpu_check_plan import run_plan_check

    result = run_plan_check(torch.device("cpu"), shape="tiny", layers=6, tokens=3, repeats=1)
    assert result["decoder_tiers"] == {"L1": 2, "L2": 2, "L3": 2}
    assert result["held_units"] >= 4
    assert result["measured_decode_s"] > 0 and result["predicted_decode_s"] > 0
    assert sys.modules["gpu_check_plan"].PROMPT
