"""The accuracy benchmark: its mode/budget plan and a smoke run of main() on the tiny random model."""
import json
from pathlib import Path

import pytest
import torch

from benchmarks.accuracy import (MODE_SPECS, TASK_SHORT, accuracy_table, build_parser, main, mode_mass,
                                 recall_variant, sparse_config)
from training.tasks import ALL_TASKS, RULER_TASKS, TASKS, generate_examples

TINY = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny-random"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes gain nothing from threads, and the CI cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sparse_config_per_spec():
    kw = dict(page_size=8, sink_tokens=4, local_window=16, dense_layers=2, compact_bits=8, compact_group=16)
    cfg = sparse_config("herald-split", 5.0, **kw)
    assert (cfg.source, cfg.budget_fraction, cfg.page_size, cfg.compact_bits) == ("split", 0.05, 8, 8)
    assert sparse_config("herald-cpu", 1.0, **kw).source == "cpu"
    lookahead = sparse_config("herald-lookahead", 5.0, **kw)
    assert (lookahead.source, lookahead.lookahead) == ("gpu-compact", True)
    assert not sparse_config("herald-gpu-compact", 5.0, **kw).lookahead
    assert sparse_config("dense", None, **kw).budget_fraction == 0.05  # unused by dense
    assert recall_variant("herald-gpu-compact", 4, 16) == ("herald-int4", "page16", "max")
    # herald selects with one query per block position (its default); the mean-query row as mage does
    assert recall_variant("herald-cpu", 4, 16) == ("herald-positions", "page16", "max")
    assert recall_variant("herald-mean-query", 4, 16) == recall_variant("mage", 4, 16) == ("mage", "page16", "max")
    assert sparse_config("herald-mean-query", 5.0, **kw).selection_query("herald") == "mean"
    assert sparse_config("herald-cpu", 5.0, **kw).selection_query("herald") == "positions"
    assert recall_variant("quest", 4, 16) == ("quest", "page16", "bound")
    assert recall_variant("dense", 4, 16) is None


def test_mode_mass_averages_the_modes_sparse_layers():
    rec = {"rows": [{"variant": v, "granularity": "page16", "aggregate": "max", "budget": "5%",
                     "mass_by_layer": [0.2, 0.4, 0.6, 0.8]} for v in ("mage", "herald-positions")]}
    # the sparse modes keep layers 0-1 dense by default: mean of layers 2-3; with none dense, all 4
    assert mode_mass(rec, "mage", 5.0, 4, 16, 4, 2) == pytest.approx(0.7)
    assert mode_mass(rec, "herald-cpu", 5.0, 4, 16, 4, 2) == pytest.approx(0.7)
    assert mode_mass(rec, "herald-cpu", 5.0, 4, 16, 4, 0) == pytest.approx(0.5)
    assert mode_mass(rec, "mage", 5.0, 4, 16, 2, 2) == 1.0  # every layer dense
    assert mode_mass(rec, "dense", 5.0, 4, 16, 4, 2) == 1.0
    assert mode_mass(rec, "quest", 5.0, 4, 16, 4, 2) is None  # no quest row recorded


def test_main_smoke_writes_json(tmp_path, capsys):
    out = tmp_path / "accuracy.json"
    tasks = ("passkey", "kv")
    assert main(["--model", str(TINY), "--contexts", "256", "--per-task", "1", "--tasks", *tasks,
                 "--budgets", "5", "10", "--recall", "--recall-blocks", "2", "--dense-layers", "1",
                 "--device", "cpu", "--no-plot", "--no-progress", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"model", "contexts", "tasks", "rows", "recall", "per_task", "seed", "split"} <= set(data)
    # No --split given: the reported numbers come from the test split, which no training-time decision saw.
    assert (data["split"], data["seed"]) == ("test", 1234)
    first = {task: generate_examples(task, 256, 1, 1234, split="test")[0] for task in tasks}
    validation = {task: generate_examples(task, 256, 1, 1234, split="validation")[0] for task in tasks}
    labels = [r["label"] for r in data["rows"]]
    dense_specs = sum(spec.mode == "dense" for spec in MODE_SPECS.values())  # one row each, no budget
    assert labels[0] == "dense" and len(labels) == dense_specs + 2 * (len(MODE_SPECS) - dense_specs)
    assert {(r["mode"], r["source"]) for r in data["rows"]} >= {("herald", "cpu"), ("herald", "gpu-compact"),
                                                                ("herald", "split"), ("quest", None)}
    recall_rows = data["recall"]["256"]["rows"]
    for r in data["rows"]:
        assert set(r["accuracy"]) == set(tasks)
        # one instance per task: each cell is its verdict, the mean their average (over the one context too)
        for task in tasks:
            assert r["accuracy"][task]["256"] == r["correct"][task]["256"] / 1
        assert r["mean"]["256"] == pytest.approx(sum(r["accuracy"][t]["256"] for t in tasks) / len(tasks))
        assert r["mean_all"] == pytest.approx(r["mean"]["256"])
        # every row ran the test split's first instance of each task, judged by the checker
        assert [s["task"] for s in r["samples"]] == list(tasks)
        for sample in r["samples"]:
            ex = first[sample["task"]]
            assert (sample["prompt_tail"], sample["answer"]) == (ex.prompt[-80:], ex.answer)
            assert sample["prompt_tail"] != validation[sample["task"]].prompt[-80:]
            assert sample["correct"] == ex.check(sample["prediction"])
            assert r["correct"][sample["task"]]["256"] == int(sample["correct"])
        # the mass column: dense keeps everything; a sparse row, the recall row of its selection at the
        # one sparse layer of this 2-layer model (--dense-layers 1)
        if r["mode"] == "dense":
            assert r["mass"]["256"] == 1.0
            continue
        variant, granularity, aggregate = recall_variant(r["spec"], data["sparse"]["compact_bits"],
                                                         data["sparse"]["page_size"])
        [row] = [x for x in recall_rows if (x["variant"], x["granularity"], x["aggregate"], x["budget"])
                 == (variant, granularity, aggregate, f"{r['budget_percent']:g}%")]
        assert r["mass"]["256"] == row["mass_by_layer"][1]
    assert len(data["recall"]["256"]["query_cosine"]["by_layer"]) == 2
    printed = capsys.readouterr().out
    assert "herald-gpu-compact 5%" in printed and "256:mean" in printed
    assert "1 instance(s) of the test split (seed 1234)" in printed.splitlines()[0]


def test_ruler_tasks_are_chosen_by_name_or_group_and_label_distinct_columns():
    args = build_parser().parse_args(["--model", str(TINY), "--tasks", "ruler"])
    assert args.tasks == list(RULER_TASKS)
    assert build_parser().parse_args(["--model", str(TINY)]).tasks == list(TASKS)  # the default stays the four
    labels = [TASK_SHORT.get(t, t) for t in ALL_TASKS]
    assert len(set(labels)) == len(ALL_TASKS) and TASK_SHORT.get("vt", "vt") == "vt"  # RULER's vt keeps its name
    rows = [{"label": "dense", "accuracy": {t: {"4096": 1.0} for t in ("vartrack", "vt")}, "mean": {"4096": 1.0},
             "mean_all": 1.0}]
    header = accuracy_table({"contexts": [4096], "tasks": ["vartrack", "vt"], "rows": rows}).splitlines()[0].split()
    assert header[3:5] == ["4096:vtr", "4096:vt"]  # after "mode / budget"
