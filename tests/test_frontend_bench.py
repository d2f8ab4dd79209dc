"""benchmarks/frontend_bench.py end to end in its quickest mode: the JSON it writes has the
shape its readers expect and finite, positive figures. Its speed is not tested (a
benchmark, not a test)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "frontend_bench.py"
FIGURES = ("requests_per_s", "texts_per_s", "p50_ms", "p99_ms", "server_cpu_cores",
           "cpu_us_per_request", "cpu_us_per_text", "client_cpu_cores")


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_run_writes_a_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "frontend_bench.json"
    # One front-end setting keeps it short whether or not serve has --frontends yet.
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--duration", "0.5", "--warmup", "0.25",
         "--frontends", "1", "--gpu", "off", "--json", str(out),
         "--work", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())

    assert report["benchmark"] == "frontend_bench"
    assert isinstance(report["frontends_available"], bool)
    assert report["machine"]["cores"] >= 1 and report["code"]["package"]
    assert report["workload"]["texts"] == 256 and positive(report["workload"]["mean_tokens"])
    tok = report["tokenizer"]
    assert positive(tok["batch32_us_per_text"]) and positive(tok["single_us_per_text"])

    rows = {(row["load"], row["setup"]): row for row in report["rows"]}
    assert set(rows) == {(load, setup) for load in ("single", "batch32")
                         for setup in ("floor", "embedrpc")}
    for (load, setup), row in rows.items():
        assert row["available"], row
        batch = 1 if load == "single" else 32
        assert row["batch"] == batch and row["clients"] == (32 if batch == 1 else 4)
        for name in FIGURES:
            assert positive(row[name]), (load, setup, name, row.get(name))
        assert row["p99_ms"] >= row["p50_ms"]
        assert math.isclose(row["texts_per_s"], batch * row["requests_per_s"], rel_tol=1e-9)
        assert math.isclose(row["cpu_us_per_request"], batch * row["cpu_us_per_text"],
                            rel_tol=1e-9)
        assert len(row["rounds"]) == 1
        if setup == "embedrpc":
            assert row["rows_per_batch"] >= 1  # from its Prometheus histogram
    floor = rows[("batch32", "floor")]
    assert math.isclose(floor["floor_us_per_text"],
                        floor["cpu_us_per_text"] + tok["batch32_us_per_text"])
    for load in ("single", "batch32"):
        assert positive(report["ratios"][f"{load}/embedrpc/vs_floor"])

    assert report["gpu"] == {"ran": False, "skipped": "--gpu off"}
    assert len(report["targets"]) == 5
    assert "| single-text Embed, 32 clients | floor" in report["table"]
    assert report["table"] in proc.stdout
