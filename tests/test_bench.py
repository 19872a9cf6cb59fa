import json

import numpy as np
import pytest

from demo import bench, coco_eval


def test_synthetic_coco_is_a_detector_like_result():
    gt, results = bench.synthetic_coco(images=30, classes=5, detections=12)
    assert len(gt["images"]) == 30 and len(gt["categories"]) == 5
    assert len(results) == 30 * 12
    assert {r["image_id"] for r in results} == {i["id"] for i in gt["images"]}
    assert all(r["bbox"][2] >= 1 and r["bbox"][3] >= 1 for r in results)
    ap = coco_eval.evaluate(gt, results, "pycocotools").stats["AP"]
    assert 0.05 < ap < 0.9  # jittered truths among clutter: neither trivial nor perfect


def test_summary_takes_medians_and_ratios_against_the_first_variant():
    row = bench.Row("a step", "moco", ("original", "ours"), {"batch": 4})
    samples = {"original": [10.0, 12.0, 50.0], "ours": [25.0, 5.0, 24.0]}
    infos = {v: {"peak_memory_bytes": 1} for v in row.variants}
    out = bench.summarise(row, samples, infos, {})
    assert out["variants"]["original"]["median"] == 12.0 and out["variants"]["original"]["ratio"] == 1.0
    assert out["variants"]["ours"]["ratio"] == pytest.approx(2.0)  # img/s: higher is faster
    timed = bench.Row("an evaluation", "coco", ("pycocotools", "faster"))
    stats = {"pycocotools": dict.fromkeys(coco_eval.STAT_NAMES, 0.5),
             "faster": {**dict.fromkeys(coco_eval.STAT_NAMES, 0.5), "AP75": 0.5 + 1e-3}}
    out = bench.summarise(timed, {"pycocotools": [6.0], "faster": [1.5]}, infos | {"pycocotools": {}, "faster": {}},
                          stats)
    assert out["unit"] == "s" and out["variants"]["faster"]["ratio"] == pytest.approx(4.0)  # seconds: lower wins
    assert out["stats_max_difference"] == pytest.approx(1e-3)


def test_measure_runs_each_variant_in_its_own_process_and_compares_coco_stats():
    row = bench.Row("COCO evaluation", "coco", ("pycocotools", "faster"), dict(images=20, classes=4, detections=8))
    out = bench.measure(row, rounds=2, device=bench.torch.device("cpu"))
    assert set(out["variants"]) == {"pycocotools", "faster"}
    assert all(len(v["samples"]) == 2 and v["peak_memory_bytes"] > 2**20 for v in out["variants"].values())
    assert out["stats_max_difference"] < 1e-12
    table = bench.table([out])
    assert "COCO evaluation" in table and "1.00x" in table


def test_a_variant_process_that_dies_is_an_error_naming_it():
    row = bench.Row("MoCo step", "moco", ("original",), dict(arch="no_such_resnet", size=8, batch=2, K=4))
    with pytest.raises(RuntimeError, match="the process of MoCo step, original died"):
        bench.measure(row, rounds=1, device=bench.torch.device("cpu"))


def test_the_compile_row_runs_only_when_asked_for(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(bench, "matmul_peak", lambda dtype, device, seconds: 1.0)
    monkeypatch.setattr(bench, "measure", lambda row, rounds, device: ran.append(row.kind) or {
        "row": row.name, "unit": row.unit, "params": row.params, "variants": {}})
    bench.main(["--quick", "--output-dir", str(tmp_path)])
    assert "compile" not in ran and {"moco", "epoch", "coco"} <= set(ran)
    ran.clear()
    bench.main(["--quick", "--only", "compile", "--output-dir", str(tmp_path)])
    assert ran == ["compile"]
    compiled = next(r for r in bench.rows(False, tmp_path) if r.kind == "compile")
    assert compiled.variants == ("ours", "ours, torch.compile") and compiled.params["arch"] == "resnet18"


@pytest.mark.slow
def test_quick_bench_writes_every_row(tmp_path, tiny_data):
    results = bench.main(["--quick", "--rounds", "1", "--output-dir", str(tmp_path),
                          "--data", str(tiny_data / "train")])
    written = json.loads((tmp_path / "bench.json").read_text())
    assert [r["row"] for r in written["rows"]] == [r.name for r in bench.rows(True, tiny_data) if not r.on_request]
    assert written["machine"]["device"] == "cpu" and written["matmul_peak_flops"]["float32"] > 0
    moco = written["rows"][0]["variants"]
    assert all(v["flops"] > 0 and 0 < v["peak_share"] and v["warmup_s"] > 0 for v in moco.values())
    assert all(np.isfinite(v["ratio"]) for r in results for v in r["variants"].values())
