"""benchmarks.serve at CI size: a real server on loopback, concurrent streaming openai clients,
the offline generate beside it; the figures it prints and writes are whole and sane."""
import json

import pytest

pytest.importorskip("openai", reason="needs the test extra (openai, fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="needs the test extra (openai, fastapi, uvicorn)")

from benchmarks.serve import main  # noqa: E402


def test_serve_benchmark_reports_sane_figures(tmp_path, capsys):
    mode = "herald"
    out = tmp_path / "serve.json"
    # one thread: see tests/runtime/test_server.py (torch's OpenMP threads on a shared 2-core machine)
    code = main(["--mode", mode, "--context", "128", "--max-new-tokens", "8", "--clients", "2", "--requests", "4",
                 "--device", "cpu", "--threads", "1", "--timeout", "120", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["meta"]["mode"] == mode and data["meta"]["clients"] == 2 and data["meta"]["requests"] == 4
    assert data["meta"]["torch_threads"] == 1
    for side in ("server", "offline"):
        f = data[side]
        assert f["requests"] == f["completed"] == 4 and f["errors"] == 0
        assert f["tokens"] == 4 * 8  # eos ignored: every request generates max_new_tokens
        assert f["wall_s"] > 0 and f["requests_per_s"] > 0
        assert f["tokens_per_s"] == pytest.approx(f["tokens"] / f["wall_s"])
        for name in ("first_block_ms", "block_ms"):
            p = f[name]
            assert 0 < p["p50"] <= p["p90"] <= p["p99"], (side, name, p)
    assert data["server"]["finish_reasons"] == ["length"]
    assert data["server_over_offline_tokens_per_s"] == pytest.approx(
        data["server"]["tokens_per_s"] / data["offline"]["tokens_per_s"])
    printed = capsys.readouterr().out
    assert "server (HTTP)" in printed and "offline generate" in printed and "server tokens/s over offline" in printed
