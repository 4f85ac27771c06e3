"""The scan benchmark on the CPU: its host rows are real timings of the numba scan, written as JSON."""
import json

from benchmarks.scan import main, table


def test_cpu_rows_and_json(tmp_path, capsys):
    out = tmp_path / "scan.json"
    assert main(["--cpu-contexts", "1024", "--queries", "1", "3", "--cpu-reps", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    host = [r for r in data["rows"] if r["where"].startswith("cpu")]
    assert [r["queries"] for r in host] == [1, 3]
    assert all(r["ms"] > 0 and r["bytes"] == 1024 * 8 * 128 * 2 for r in host)
    assert "numba" in capsys.readouterr().out
    assert "x R=1" in table(host)
