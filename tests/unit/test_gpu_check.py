"""benchmarks/gpu_check.py on a machine without a GPU: one clear error, exit 2, no file written; a typo'd part
name is refused the same way."""

import subprocess
import sys

from helpers import REPO


def test_gpu_check_refuses_a_machine_without_a_gpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and proc.stderr.startswith("error: no CUDA GPU visible here"), proc.stderr
    assert not out.exists()
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--skip", "mfu,tset"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--skip tset: expected parts among environment,tests," in proc.stderr
