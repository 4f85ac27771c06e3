"""The scan benchmark on the CPU: its host rows are real timings of the numba scan, written as JSON."""
import json

from benchmarks.scan import main, table


def test_cpu_rows_and_json(tmp_path, capsys):
    out = tmp_path / "scan.json"
    assert main(["--cpu-contexts", "1024", "--queries", "1", "3", "--cpu-reps", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    host = [r for r in data["rows"] if r["where"].startswith("cpu")]
    assert [r["queries"] for r in host] == [1, 3]
    for r in host:  # the rate is the bytes over the time; a CPU scan has no HBM floor to be over
        assert r["ms"] > 0 and r["bytes"] == 1024 * 8 * 128 * 2
        assert r["GBps"] == r["bytes"] / r["ms"] / 1e6 and r["over_floor"] is None
    assert "numba" in capsys.readouterr().out
    # the table's last column: each row's time over the same scan's with one query
    lines = table(host).splitlines()
    assert lines[0].endswith("x R=1")
    assert [line.split()[-1] for line in lines[2:]] == ["1.00", f"{host[1]['ms'] / host[0]['ms']:.2f}"]
