"""demo.onnx_export: a tiny untrained detector exported once, run by onnxruntime and compared with PyTorch.

The detector's box classifier weights are scaled up and its background biased, so that it finds 60 to 70 boxes an
image of three classes with scores spread over (0.05, 1): with test_predict's bias alone every score is 0.9999, and
near-equal scores swap places or cross the 100-detection cut between any two runtimes, which leaves nothing sharp to
assert. Tolerances: boxes within 0.01 px (measured: about 1e-4 px), scores within 1e-4 (measured: about 1e-5)."""
import json
import re
import sys

import numpy as np
import pytest
import torch
from detector_checkpoints import save_detector
from PIL import Image

from demo import onnx_export as ox
from demo.model import detector_from_checkpoint
from moco.runtime import checkpoint

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

CATEGORIES = {3: "cup", 7: "bird", 12: "hat", 20: "dog"}  # ids with gaps: labels 1..4 map to them
BOX_TOLERANCE = 0.01  # pixels
SCORE_TOLERANCE = 1e-4
# torchvision's own traced resize makes a 55-pixel short side 127 px at min_size 128, eager PyTorch 128 (see
# ox.ExportTransform): the test of the exported model's sizes.
ODD_SIZE = (55, 74)


def noise_png(path, height, width, seed):
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """A demo.train-style checkpoint whose classifier gives confident, well-spread scores."""
    def tilt(cls_score):
        cls_score.weight.mul_(20)
        cls_score.bias[0] = 9.0  # background: fewer than 100 detections

    return save_detector(tmp_path_factory.mktemp("detector") / "final.pth.tar", CATEGORIES, 128, tilt)


@pytest.fixture(scope="module")
def exported(detector, tmp_path_factory):
    """The detector exported by the command line, checked on an image file besides the synthetic ones."""
    folder = tmp_path_factory.mktemp("onnx")
    image = noise_png(folder / "a.png", 150, 90, 1)
    return ox.main(["--checkpoint-path", str(detector), str(folder / "model.onnx"), "--verify", str(image)])


@pytest.fixture(scope="module")
def onnx_session(exported):
    return ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def pytorch_model(detector):
    model, _ = detector_from_checkpoint(checkpoint.load(detector), detector, CATEGORIES)
    return model.eval()


@pytest.mark.parametrize("height, width", [(96, 128), (160, 100), ODD_SIZE])
def test_onnxruntime_finds_what_pytorch_finds_at_any_image_size(onnx_session, pytorch_model, height, width):
    """The traced size was 128x170; the others run through the dynamic axes."""
    image = ox.synthetic(height, width, seed=height)
    expected = ox.run_torch(pytorch_model, image)
    found = dict(zip(ox.OUTPUTS, onnx_session.run(None, {"image": image.numpy()})))
    assert found["boxes"].dtype == np.float32 and found["labels"].dtype == np.int64
    n = len(expected["scores"])
    assert 20 < n < 100 and len(set(expected["labels"].tolist())) > 1  # of several classes, none cut at 100
    assert len(found["scores"]) == n
    assert np.array_equal(np.sort(found["labels"]), np.sort(expected["labels"]))
    assert np.abs(np.sort(found["scores"]) - np.sort(expected["scores"])).max() <= SCORE_TOLERANCE
    comparison = ox.compare("x", expected, found, SCORE_TOLERANCE)  # pairs them: near-equal scores may swap
    assert comparison.pairs == n and not comparison.at_cut and not comparison.unpaired
    assert comparison.box <= BOX_TOLERANCE and comparison.score <= SCORE_TOLERANCE


def test_the_file_names_its_categories_and_takes_one_image_of_any_size(exported):
    model = onnx.load(str(exported))
    metadata = {p.key: p.value for p in model.metadata_props}
    assert json.loads(metadata["categories"]) == [[1, 3, "cup"], [2, 7, "bird"], [3, 12, "hat"], [4, 20, "dog"]]
    assert json.loads(metadata["model_config"])["min_size"] == 128
    (image,) = model.graph.input
    dims = [d.dim_value or d.dim_param for d in image.type.tensor_type.shape.dim]
    assert image.name == "image" and dims == [3, "height", "width"]
    assert [o.name for o in model.graph.output] == list(ox.OUTPUTS)
    assert not list(exported.parent.glob(".*.tmp*"))  # the atomic write left no temporary file


# ox.compare, which the tool's check and the test above rely on


def detections(*rows):
    """(label, score, x1) rows: boxes 10 px wide and high at x1."""
    return {"boxes": np.array([[x, 0, x + 10, 10] for _, _, x in rows], np.float32).reshape(-1, 4),
            "labels": np.array([label for label, _, _ in rows], np.int64),
            "scores": np.array([score for _, score, _ in rows], np.float32)}


def test_near_equal_scores_in_another_order_are_no_difference():
    expected = detections((1, 0.9, 0), (2, 0.80001, 50), (1, 0.8, 20), (1, 0.3, 40))
    found = detections((1, 0.9, 0.002), (1, 0.80002, 20), (2, 0.80001, 50), (1, 0.3, 40))
    comparison = ox.compare("x", expected, found)
    assert comparison.pairs == 4 and comparison.agrees(0.01)
    assert comparison.box == pytest.approx(0.002, abs=1e-6) and comparison.score == pytest.approx(2e-5, abs=1e-6)


@pytest.mark.parametrize("changed, why", [
    ((1, 0.8, 23), "a box moved 3 px"),
    ((2, 0.8, 20), "another label"),
    ((1, 0.81, 20), "another score"),
])
def test_a_moved_box_another_label_or_score_is_a_difference(changed, why):
    expected = detections((1, 0.9, 0), (1, 0.8, 20), (1, 0.3, 40))
    assert not ox.compare("x", expected, detections((1, 0.9, 0), changed, (1, 0.3, 40))).agrees(1.0), why


def test_a_detection_on_one_side_is_tolerated_only_at_the_cut():
    expected = detections((1, 0.9, 0), (1, 0.8, 20), (1, 0.05001, 40))  # its partner fell under the 0.05 threshold
    comparison = ox.compare("x", expected, detections((1, 0.9, 0), (1, 0.8, 20)))
    assert comparison.agrees(1.0) and comparison.at_cut == [("PyTorch", 1, pytest.approx(0.05001))]
    comparison = ox.compare("x", expected, detections((1, 0.9, 0), (1, 0.05001, 40)))  # 0.8 missing: above the cut
    assert not comparison.agrees(1.0) and [u[:2] for u in comparison.unpaired] == [("PyTorch", 1)]
    assert "1 on one side only" in comparison.summary()


# the command line's errors


def test_a_disagreement_stops_with_status_70_and_writes_nothing(detector, exported, tmp_path, monkeypatch, capsys):
    """ONNX boxes 2 px off (the export itself reused, to save its seconds): the check stops before the write."""
    onnx_bytes = exported.read_bytes()
    monkeypatch.setattr(ox, "export_onnx", lambda model, example, opset: onnx_bytes)
    run_onnx = ox.run_onnx

    def shifted(sess, image):
        found = run_onnx(sess, image)
        return {**found, "boxes": found["boxes"] + 2}

    monkeypatch.setattr(ox, "run_onnx", shifted)
    with pytest.raises(SystemExit) as stop:
        ox.main(["--checkpoint-path", str(detector), str(tmp_path / "model.onnx")])
    assert stop.value.code == ox.EXIT_MISMATCH == 70
    error = capsys.readouterr().out.splitlines()[-1]
    assert "ONNX and PyTorch disagree on synthetic 128x170" in error and "box 2 px" in error
    assert "nothing written (exit status 70)" in error
    assert list(tmp_path.iterdir()) == []


def test_a_missing_or_unreadable_checkpoint_is_named_in_one_line(tmp_path):
    missing = tmp_path / "nowhere.pth.tar"
    with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(missing))}: no such checkpoint$"):
        ox.main(["--checkpoint-path", str(missing), str(tmp_path / "m.onnx")])
    garbage = tmp_path / "garbage.pth.tar"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(garbage))}: not a readable checkpoint \([^\n]*\)$"):
        ox.main(["--checkpoint-path", str(garbage), str(tmp_path / "m.onnx")])
    backbone = tmp_path / "backbone.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, backbone)
    with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(backbone))}: not a detector checkpoint"):
        ox.main(["--checkpoint-path", str(backbone), str(tmp_path / "m.onnx")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.pth", "garbage.pth.tar"]


def test_bad_arguments_stop_before_the_export(detector, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"")
    with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(broken))}: cannot read image"):
        ox.main(["--checkpoint-path", str(detector), str(tmp_path / "m.onnx"), "--verify", str(broken)])
    with pytest.raises(SystemExit, match=r"^error: .*final\.pth\.tar: is the checkpoint being exported"):
        ox.main(["--checkpoint-path", str(detector), str(detector)])
    assert list(tmp_path.iterdir()) == [broken]


def test_without_onnxruntime_it_says_what_to_install(detector, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    with pytest.raises(SystemExit, match=r"^error: onnxruntime is not installed: .*pip install onnx onnxruntime"):
        ox.main(["--checkpoint-path", str(detector), str(tmp_path / "m.onnx")])
