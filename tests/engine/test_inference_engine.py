import json
import os
import sys

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from maskrcnn.config import get_cfg
from maskrcnn.data.datasets.synthetic import SyntheticShapesDataset
from maskrcnn.engine.inference import (PARTIAL_DIR, RangeDataset, evaluate_on_dataset, inference_on_dataset,
                                       prediction_record, records_to_coco_results)

sys.path.insert(0, os.path.dirname(__file__))
from engine_toys import IndexedImages, OracleDetector  # noqa: E402


def _dataset(n=10):
    return IndexedImages(SyntheticShapesDataset("val", num_images=n, image_size=(48, 48), max_object_size=30))


def test_prediction_record_binarises_and_encodes_masks():
    probs = torch.zeros(2, 1, 6, 8)
    probs[0, 0, 1:3, 2:5] = 0.9
    probs[1, 0, 4:, :] = 0.5  # exactly the threshold: not in the mask (> threshold)
    out = {"boxes": torch.tensor([[2.0, 1.0, 5.0, 3.0], [0.0, 4.0, 8.0, 6.0]]), "scores": torch.tensor([0.9, 0.3]),
           "labels": torch.tensor([2, 1]), "masks": probs}
    rec = prediction_record(3, 42, out, mask_threshold=0.5)
    json.dumps(rec)
    assert rec["index"] == 3 and rec["image_id"] == 42 and rec["labels"] == [2, 1]
    assert rec["boxes"] == [[2.0, 1.0, 5.0, 3.0], [0.0, 4.0, 8.0, 6.0]]
    assert np.array_equal(mask_util.decode(rec["segms"][0]), (probs[0, 0] > 0.5).numpy().astype(np.uint8))
    assert mask_util.decode(rec["segms"][1]).sum() == 0


def test_records_to_coco_results_maps_categories_and_xywh():
    class DS:
        classes = ["__background__", "a", "b"]
        contiguous_to_category_id = {1: 7, 2: 9}

    recs = [{"index": 0, "image_id": 5, "boxes": [[1.0, 2.0, 4.0, 8.0]], "scores": [0.5], "labels": [2],
             "segms": [{"size": [3, 3], "counts": "9"}]}]
    res = records_to_coco_results(recs, DS())
    assert res["bbox"] == [{"image_id": 5, "category_id": 9, "score": 0.5, "bbox": [1.0, 2.0, 3.0, 6.0]}]
    assert res["segm"][0]["segmentation"] == {"size": [3, 3], "counts": "9"} and res["segm"][0]["category_id"] == 9
    bad = [dict(recs[0], labels=[3])]
    with pytest.raises(ValueError, match="label 3 has no category id"):
        records_to_coco_results(bad, DS())
    no_masks = [{k: v for k, v in recs[0].items() if k != "segms"}]
    assert "segm" not in records_to_coco_results(no_masks, DS())


def test_oracle_evaluation_is_100_and_files_are_written(tmp_path):
    ds = _dataset()
    model = OracleDetector(ds)
    cfg = get_cfg()
    lines = []
    metrics = evaluate_on_dataset(model, ds, cfg, output_dir=str(tmp_path), log=lines.append)
    assert metrics["bbox"]["AP"] == pytest.approx(100.0) and metrics["segm"]["AP"] == pytest.approx(100.0)
    for name in ("bbox_results.json", "segm_results.json", "metrics.json"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["segm"]["AP"] == pytest.approx(100.0)
    assert model.calls == len(ds)


class _Interrupt(Exception):
    pass


def test_interrupted_inference_resumes_without_redoing_images(tmp_path):
    ds = _dataset(10)
    full = inference_on_dataset(OracleDetector(ds), ds)

    def stop_after(k):
        seen = []

        def on_image(index, image, rec):
            seen.append(index)
            if len(seen) == k:
                raise _Interrupt()
        return on_image

    with pytest.raises(_Interrupt):
        inference_on_dataset(OracleDetector(ds), ds, output_dir=str(tmp_path), fingerprint="abc",
                             on_image=stop_after(4))
    partial = tmp_path / PARTIAL_DIR / "partial_rank0.jsonl"
    # A kill in the middle of a line leaves half a record: it must be dropped, not trusted.
    with open(partial, "a") as f:
        f.write('{"index": 9, "image_id": 9, "boxes": [[1')
    model = OracleDetector(ds)
    lines = []
    records = inference_on_dataset(model, ds, output_dir=str(tmp_path), fingerprint="abc", resume=True,
                                   log=lines.append)
    assert model.calls == 6  # 4 were done
    assert any("4 of 10 images already done" in ln for ln in lines)
    assert records == full
    # Everything is done now: a third run has nothing left to do.
    model = OracleDetector(ds)
    assert inference_on_dataset(model, ds, output_dir=str(tmp_path), fingerprint="abc", resume=True) == full
    assert model.calls == 0


def test_resume_with_another_fingerprint_says_it_cannot_and_reruns(tmp_path):
    ds = _dataset(5)
    inference_on_dataset(OracleDetector(ds), ds, output_dir=str(tmp_path), fingerprint="old")
    model = OracleDetector(ds)
    lines = []
    inference_on_dataset(model, ds, output_dir=str(tmp_path), fingerprint="new", resume=True, log=lines.append)
    assert model.calls == 5
    assert any("cannot resume" in ln and "another checkpoint, config or dataset" in ln for ln in lines)


def test_without_resume_old_partial_results_are_discarded(tmp_path):
    ds = _dataset(4)
    inference_on_dataset(OracleDetector(ds), ds, output_dir=str(tmp_path), fingerprint="f")
    model = OracleDetector(ds)
    inference_on_dataset(model, ds, output_dir=str(tmp_path), fingerprint="f", resume=False)
    assert model.calls == 4
    lines = (tmp_path / PARTIAL_DIR / "partial_rank0.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 4  # header + one line per image, no duplicates


def test_range_dataset_and_progress_lines(tmp_path):
    ds = _dataset(10)
    part = RangeDataset(ds, 3, 7)
    assert len(part) == 4 and part.get_image_info(0)["id"] == 3 and part.classes == ds.classes
    with pytest.raises(ValueError, match="--range"):
        RangeDataset(ds, 12, 20)
    stream = open(tmp_path / "progress.txt", "w")
    recs = inference_on_dataset(OracleDetector(ds), part, progress_stream=stream)
    stream.close()
    assert [r["image_id"] for r in recs] == [3, 4, 5, 6]
    text = (tmp_path / "progress.txt").read_text()
    assert "\r" not in text and "4/4" in text  # a file gets plain lines, not a redrawn bar


def test_prediction_record_maps_a_reduced_image_back_to_the_recorded_size():
    probs = torch.zeros(1, 1, 3, 4)
    probs[0, 0, 1:, 2:] = 1.0
    out = {"boxes": torch.tensor([[2.0, 1.0, 4.0, 3.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1]),
           "masks": probs}
    rec = prediction_record(0, 1, out, image_size=(3, 4), original_size=(12, 16))
    assert rec["boxes"] == [[8.0, 4.0, 16.0, 12.0]]
    full = mask_util.decode(rec["segms"][0])
    assert full.shape == (12, 16) and full.sum() == 8 * 8 and full[4:, 8:].all()
    same = prediction_record(0, 1, out, image_size=(3, 4), original_size=(3, 4))
    assert same["boxes"] == [[2.0, 1.0, 4.0, 3.0]] and mask_util.decode(same["segms"][0]).shape == (3, 4)


def test_evaluation_of_images_read_reduced_is_in_the_json_coordinates(tmp_path):
    """A dataset that reads its 800x600 image reduced to 200x150 (``max_image_side``): the oracle predicts the
    reduced ground truth, and the results must still match the full-size ground truth exactly."""
    import cv2

    from maskrcnn.data.datasets.coco import COCODataset

    (tmp_path / "big.png").write_bytes(cv2.imencode(".png", np.full((600, 800, 3), 90, np.uint8))[1].tobytes())
    anns = [{"id": k + 1, "image_id": 1, "category_id": 1, "bbox": [x, y, w, h], "area": float(w * h), "iscrowd": 0,
             "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}
            for k, (x, y, w, h) in enumerate([(100, 200, 400, 200), (600, 40, 120, 80)])]
    data = {"images": [{"id": 1, "file_name": "big.png", "height": 600, "width": 800}], "annotations": anns,
            "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    ds = IndexedImages(COCODataset(str(tmp_path / "ann.json"), str(tmp_path), max_image_side=200))
    ds.coco = ds.dataset.coco
    assert ds[0][0].shape == (3, 150, 200)
    metrics = evaluate_on_dataset(OracleDetector(ds), ds, get_cfg(), output_dir=str(tmp_path / "out"),
                                  log=lambda m: None)
    assert metrics["bbox"]["AP"] == pytest.approx(100.0) and metrics["segm"]["AP"] == pytest.approx(100.0)
    dets = json.loads((tmp_path / "out" / "bbox_results.json").read_text())
    assert sorted(d["bbox"] for d in dets) == sorted(a["bbox"] for a in anns)
