"""`dsv3 bench serve --speculative-config` and `dsv3 bench spec` on the CPU (the tiny checkpoint and its config):
the runs complete and report what the lead reads on a GPU. Timings on a shared CPU mean nothing; not asserted."""

from __future__ import annotations

import gc
import json
import weakref

import pytest

from dsv3 import cli
from dsv3.api import TINY_CHECKPOINT


def test_bench_serve_sets_speculation_beside_the_same_engine_without(tmp_path, capsys):
    out = tmp_path / "serve.json"
    code = cli.main(["bench", "serve", "--ckpt", str(TINY_CHECKPOINT), "--backend", "reference", "--precision", "fp32",
                     "--speculative-config", '{"method": "mtp", "num_speculative_tokens": 2}', "--num-prompts", "2",
                     "--input-len", "8", "--output-len", "24", "--max-concurrency", "1", "--num-warmups", "0",
                     "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "Mean acceptance length (tokens/step):" in printed and "Speed-up, output throughput:" in printed
    [m] = json.loads(out.read_text())["records"]
    assert m["spec_num_drafts"] > 0 and 1 <= m["spec_mean_acceptance_length"] <= 3
    assert m["spec_speedup"] == pytest.approx(m["output_throughput"] / m["plain_output_throughput"])


@pytest.mark.exhaustive
def test_bench_spec_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "spec.json"
    code = cli.main(["bench", "spec", "--backend", "reference", "--precision", "fp32", "--config",
                     str(TINY_CHECKPOINT / "config.json"), "--layers", "2", "--batch", "1", "2", "--context", "16",
                     "--quick", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "projected V3 batch-1 speed-up at acceptance 0.85" in printed and "tiny checkpoint, batch 1, k=3" in printed
    data = json.loads(out.read_text())
    assert [r["batch"] for r in data["steps"]] == [1, 2]
    assert all(r[f"draft{k}_ms"] > 0 and r[f"verify{k}_ms"] > 0 for r in data["steps"] for k in (1, 2, 3))
    assert [r["k"] for r in data["tiny"]] == [0, 1, 2, 3] and all(r["acceptance"] > 0 for r in data["tiny"][1:])


def test_bench_spec_times_the_recorded_draft_where_steps_record(monkeypatch):
    """With a backend that records (the CPU stand-in), the draft is timed through the engine's recorded draft
    step, for every k; and nothing keeps the model alive after model_steps."""
    import argparse

    from dsv3.backends.reference import ReferenceBackend

    from dsv3.bench import spec
    from dsv3.serving.draft_recording import DraftRecordings

    class Recording(ReferenceBackend):  # tests/serving/test_recorded_rows.py's stand-in: the step is its recording
        def graph_runner(self, step):
            return step

    built, build = [], spec._build
    monkeypatch.setattr(spec, "_build", lambda *a: built.append(weakref.ref((r := build(*a))[0])) or r)
    runs = []
    original = DraftRecordings.run
    monkeypatch.setattr(DraftRecordings, "run", lambda self, *a: runs.append(self.k) or original(self, *a))
    args = argparse.Namespace(config=str(TINY_CHECKPOINT / "config.json"), batch=[2], context=[16], precision="fp32",
                              layers=2, quick=True, acceptance=0.85)
    [row] = spec.model_steps(args, Recording("cpu"))
    assert set(runs) == {1, 2, 3} and row["draft"] == "recorded"
    assert all(row[f"draft{k}_ms"] > 0 for k in (1, 2, 3))
    gc.collect()
    assert built and built[0]() is None, "the V3-dimension model outlives model_steps (the tiny run needs its memory)"
