"""Router metrics (accuracy, precision, recall, confusion) and ``--route-only``."""

from __future__ import annotations

import json

from evals import latency
from evals.report import router_section
from evals.summary import router_metrics


def test_router_metrics_count_a_skeleton_mode_as_positive():
    routes = [(True, "sot"), (True, "graph"), (True, "sequential"),
              (False, "sot"), (False, "sequential"), (False, "sequential")]  # fmt: skip
    m = router_metrics(routes)
    assert m["questions"] == 6
    assert m["accuracy"] == 4 / 6
    assert m["precision"] == 2 / 3 and m["recall"] == 2 / 3
    assert m["confusion"] == {
        "suitable": {"sequential": 1, "sot": 1, "graph": 1},
        "not_suitable": {"sequential": 2, "sot": 1, "graph": 0},
    }
    assert router_metrics([(False, "sequential")])["precision"] is None
    text = "\n".join(router_section(m))
    assert "precision 67%" in text and "recall 67%" in text


def test_route_only_scores_any_labelled_set(tmp_path, capsys):
    """LIMA's format (id, question, sot_suitable; no category) works as vicuna80's."""
    rows = [
        {"id": 0, "question": "What are some ways to reduce stress at work?", "sot_suitable": True},
        {"id": 1, "question": "Write a python function that reverses a list.",
         "sot_suitable": False},
        {"id": 2, "question": "What are the benefits of learning a second language?",
         "sot_suitable": True},
    ]  # fmt: skip
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    code = latency.main(["--route-only", "--dataset", str(data), "--out", str(out),
                         "--route-baseline", "1", "--max-tokens", "8"])  # fmt: skip
    assert code == 0
    result = json.loads((out / "router.json").read_text())
    assert result["questions"] == 3 and result["dataset"] == "set.jsonl"
    assert sum(sum(row.values()) for row in result["confusion"].values()) == 3
    assert result["median_route_s"] > 0 and result["route_share_of_sequential"] > 0
    assert "router on set.jsonl" in capsys.readouterr().out
