import os
import subprocess
import sys

import pytest
from elastic_moe.jobs.train import choose_run_name, main, parse_workers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_describe_prints_exact_counts_for_671b():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "train.py"), "--recipe",
                           "deepseek_v3_671b", "--describe"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    total = int(lines[-3].removeprefix("total parameters: "))
    activated = int(lines[-2].removeprefix("activated parameters per token: "))
    assert lines[-1].startswith("MTP parameters")
    assert abs(total - 671e9) / 671e9 < 0.01 and abs(activated - 37e9) / 37e9 < 0.03
    assert '"num_routed_experts": 256' in proc.stdout


@pytest.mark.parametrize("argv, needle", [
    (["--workers", "4:2"], "MIN <= MAX"),
    (["--workers", "two"], "expected N or MIN:MAX"),
    (["--set", "train.nope=1"], "no field 'nope'"),
    (["--recipe", "huge"], "invalid choice"),
])
def test_bad_arguments_are_rejected_with_the_reason(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--describe"])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_workers_and_run_names(tmp_path):
    from elastic_moe.config import debug

    assert parse_workers("3") == (3, 3) and parse_workers("2:8") == (2, 8)
    assert choose_run_name(debug(), "mine", False, str(tmp_path)) == "mine"
    assert choose_run_name(debug(), None, False, str(tmp_path)).startswith("debug-")
    with pytest.raises(ValueError, match="no earlier 'debug' run"):
        choose_run_name(debug(), None, True, str(tmp_path))
    for name in ("debug-1", "debug-2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "coordinator.json").write_text("{}")
    os.utime(tmp_path / "debug-1", (1e9, 1e9))
    assert choose_run_name(debug(), None, True, str(tmp_path)) == "debug-2"
