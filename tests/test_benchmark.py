import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "epoch_speed.py"


def test_epoch_speed_benchmark_measures_all_three_paths(tmp_path, data_dir):
    out = tmp_path / "results.json"
    args = ["--models", "LightweightCNN", "--precisions", "32-true", "--limit-batches", "2"]
    args += ["--workers", "0", "--data-dir", str(data_dir), "--json", str(out)]
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert [r["path"] for r in results] == ["bound", "package", "usual"]
    for r in results:
        assert min(r["train_img_s"], r["epoch_s"], r["peak_rss_mb"]) > 0
    rows = [line for line in done.stdout.splitlines() if line.startswith("| LightweightCNN")]
    assert len(rows) == 3
    assert rows[0].split("|")[7].strip() == "1.00x"  # the bound against itself
