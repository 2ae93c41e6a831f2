"""The annotation index of a COCO json, packed into a few numpy arrays and decoded one image at a time.

Why. The straightforward index (one Python dict per annotation, a list of floats per polygon) of a COCO-sized json
(118k images, 860k annotations) costs several GB per process, and DataLoader workers forked from it copy it page by
page as they read it: reading a Python object writes its reference count, so every page a worker touches becomes
private (copy-on-write growth). Here every image and annotation field is a numpy array; reading them never writes to
the arrays' pages, so forked workers share them, and a record dict exists only for the image being read.

Layout (``A`` kept annotations, image-major: the annotations of image ``i`` are rows
``ann_start[i]:ann_start[i + 1]``, in the json's order):

* images: ``image_ids`` int64 ascending, ``heights`` / ``widths`` int32, file names as utf-8 bytes in
  ``_names`` cut at ``_name_start``;
* annotations: ``ann_ids`` int64, ``labels`` int32, ``boxes`` ``(A, 4)`` float64 x1y1x2y2 (already clipped),
  ``areas`` float64, ``iscrowd`` int32, ``flags`` (``HAS_ID``, ``HAS_AREA``), ``seg_kind`` (``POLYGONS``,
  ``RLE_STRING``, ``RLE_COUNTS``) and ``seg_ref``, a row of that kind's table;
* polygons: coordinates of every polygon one after the other, cut at ``poly_start``, the polygons of polygon
  annotation ``r`` being ``poly_of_ann[r]:poly_of_ann[r + 1]``. Coordinates are int32 hundredths when every
  value of the json is exactly ``k / 100`` (COCO's two decimals: ``int / 100.0`` gives back the very float64 the
  json parser made), float64 otherwise, so decoded polygons equal the json's numbers bit for bit;
* RLEs: compressed ``counts`` strings as utf-8 bytes cut at ``rle_str_start``, uncompressed ``counts`` lists as
  int64 cut at ``rle_counts_start``;
* keypoints: ``kp_ref`` per annotation (-1: none), a row of the ``kp_values`` float64 table cut at ``kp_start``
  (the json's ``[x1, y1, v1, ...]``).

:meth:`PackedAnnotationIndex.records` rebuilds the records of one image exactly as
:class:`~maskrcnn.data.datasets.coco.COCODataset` parses them (``id``, ``label``, ``box``, ``segmentation``,
``area``, ``iscrowd``, ``keypoints``).
"""
from __future__ import annotations

from array import array
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

__all__ = ["PackedAnnotationIndex", "PackedIndexBuilder"]

HAS_ID, HAS_AREA = 1, 2
POLYGONS, RLE_STRING, RLE_COUNTS = 0, 1, 2
_FIXED_POINT = 100.0


def _cut(parts: Sequence[int]) -> np.ndarray:
    """Offsets ``[0, len0, len0 + len1, ...]`` (int64) of consecutive parts of lengths ``parts``."""
    out = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(np.asarray(parts, dtype=np.int64), out=out[1:])
    return out


class PackedIndexBuilder:
    """Collects images and parsed annotation records (any order), then packs them with :meth:`build`.

    Records are dicts as :meth:`COCODataset._parse_annotation` returns them: ``id`` (int or None), ``label`` int,
    ``box`` 4 floats, ``segmentation`` (list of float lists, or an RLE dict whose ``size`` is the image's),
    ``area`` (float or None), ``iscrowd`` int.
    """

    def __init__(self):
        self._image_ids: List[int] = []
        self._image_pos: Dict[int, int] = {}
        self._heights = array("i")
        self._widths = array("i")
        self._names: List[bytes] = []
        # per annotation, in the order added
        self._ann_image = array("q")
        self._ann_ids = array("q")
        self._labels = array("i")
        self._boxes = array("d")
        self._areas = array("d")
        self._iscrowd = array("i")
        self._flags = array("B")
        self._seg_kind = array("B")
        self._seg_ref = array("q")
        # segmentation tables
        self._coords = array("d")
        self._poly_len: List[int] = []
        self._polys_per_ann: List[int] = []
        self._rle_str: List[bytes] = []
        self._rle_counts = array("q")
        self._rle_counts_len: List[int] = []
        # keypoints ([x1, y1, v1, ...] as in the json; -1 reference: the annotation has none)
        self._kp_ref = array("q")
        self._kp_len: List[int] = []
        self._kp_values = array("d")

    def add_image(self, image_id: int, height: int, width: int, file_name: str) -> None:
        if image_id in self._image_pos:
            raise ValueError(f"image id {image_id} appears twice in 'images'")
        self._image_pos[image_id] = len(self._image_ids)
        self._image_ids.append(image_id)
        self._heights.append(height)
        self._widths.append(width)
        self._names.append(str(file_name).encode("utf-8"))

    def add_record(self, image_id: int, record: Dict[str, Any]) -> None:
        self._ann_image.append(self._image_pos[image_id])
        ann_id = record["id"]
        self._ann_ids.append(int(ann_id) if ann_id is not None else 0)
        self._labels.append(record["label"])
        self._boxes.extend(record["box"])
        area = record["area"]
        self._areas.append(area if area is not None else 0.0)
        self._iscrowd.append(record["iscrowd"])
        self._flags.append((HAS_ID if ann_id is not None else 0) | (HAS_AREA if area is not None else 0))
        kps = record.get("keypoints")
        if kps is None:
            self._kp_ref.append(-1)
        else:
            self._kp_ref.append(len(self._kp_len))
            self._kp_len.append(len(kps))
            self._kp_values.extend(kps)
        segm = record["segmentation"]
        if isinstance(segm, list):
            self._seg_kind.append(POLYGONS)
            self._seg_ref.append(len(self._polys_per_ann))
            self._polys_per_ann.append(len(segm))
            for poly in segm:
                self._poly_len.append(len(poly))
                self._coords.extend(poly)
        elif isinstance(segm["counts"], list):
            self._seg_kind.append(RLE_COUNTS)
            self._seg_ref.append(len(self._rle_counts_len))
            self._rle_counts_len.append(len(segm["counts"]))
            self._rle_counts.extend(segm["counts"])
        else:
            counts = segm["counts"]
            self._seg_kind.append(RLE_STRING)
            self._seg_ref.append(len(self._rle_str))
            self._rle_str.append(counts.encode("utf-8") if isinstance(counts, str) else bytes(counts))

    def build(self) -> "PackedAnnotationIndex":
        """The packed index; images sorted by id, each image's annotations in the order they were added."""
        image_ids = np.asarray(self._image_ids, dtype=np.int64)
        by_id = np.argsort(image_ids, kind="stable")
        rank = np.empty_like(by_id)
        rank[by_id] = np.arange(len(by_id))
        ann_image = rank[np.frombuffer(self._ann_image, dtype=np.int64)] if len(self._ann_image) else \
            np.zeros(0, dtype=np.int64)
        order = np.argsort(ann_image, kind="stable")  # image-major, json order within an image
        names = [self._names[k] for k in by_id]

        coords = np.frombuffer(self._coords, dtype=np.float64) if len(self._coords) else np.zeros(0, np.float64)
        fixed = np.round(coords * _FIXED_POINT)
        if coords.size == 0 or (np.abs(fixed).max() < 2 ** 31 and np.array_equal(fixed / _FIXED_POINT, coords)):
            coords = fixed.astype(np.int32)
        else:
            coords = coords.copy()

        def take(buf: array, dtype, shape=(-1,)) -> np.ndarray:
            a = np.frombuffer(buf, dtype=dtype).reshape(shape) if len(buf) else np.zeros((0,) + shape[1:], dtype)
            return np.ascontiguousarray(a[order])

        return PackedAnnotationIndex(
            image_ids=image_ids[by_id], heights=np.frombuffer(self._heights, np.int32)[by_id].copy(),
            widths=np.frombuffer(self._widths, np.int32)[by_id].copy(),
            names=np.frombuffer(b"".join(names), dtype=np.uint8).copy(), name_start=_cut([len(n) for n in names]),
            ann_start=np.searchsorted(ann_image[order], np.arange(len(image_ids) + 1)).astype(np.int64),
            ann_ids=take(self._ann_ids, np.int64), labels=take(self._labels, np.int32),
            boxes=take(self._boxes, np.float64, (-1, 4)), areas=take(self._areas, np.float64),
            iscrowd=take(self._iscrowd, np.int32), flags=take(self._flags, np.uint8),
            seg_kind=take(self._seg_kind, np.uint8), seg_ref=take(self._seg_ref, np.int64),
            coords=coords, poly_start=_cut(self._poly_len), poly_of_ann=_cut(self._polys_per_ann),
            rle_str=np.frombuffer(b"".join(self._rle_str), dtype=np.uint8).copy(),
            rle_str_start=_cut([len(s) for s in self._rle_str]),
            rle_counts=np.frombuffer(self._rle_counts, np.int64).copy() if len(self._rle_counts) else
            np.zeros(0, np.int64), rle_counts_start=_cut(self._rle_counts_len),
            kp_ref=take(self._kp_ref, np.int64), kp_start=_cut(self._kp_len),
            kp_values=np.frombuffer(self._kp_values, np.float64).copy() if len(self._kp_values) else
            np.zeros(0, np.float64))


class PackedAnnotationIndex:
    """Images and annotation records of a COCO json in numpy arrays (see the module docstring for the layout).

    Built by :class:`PackedIndexBuilder`; read with :meth:`records` (one image's records as dicts),
    :meth:`file_name` and the public arrays ``image_ids``, ``heights``, ``widths``, ``ann_start``, ``iscrowd``.
    """

    def __init__(self, *, image_ids, heights, widths, names, name_start, ann_start, ann_ids, labels, boxes, areas,
                 iscrowd, flags, seg_kind, seg_ref, coords, poly_start, poly_of_ann, rle_str, rle_str_start,
                 rle_counts, rle_counts_start, kp_ref, kp_start, kp_values):
        self.image_ids, self.heights, self.widths = image_ids, heights, widths
        self._names, self._name_start, self.ann_start = names, name_start, ann_start
        self.ann_ids, self.labels, self.boxes, self.areas = ann_ids, labels, boxes, areas
        self.iscrowd, self.flags, self.seg_kind, self.seg_ref = iscrowd, flags, seg_kind, seg_ref
        self.coords, self.poly_start, self.poly_of_ann = coords, poly_start, poly_of_ann
        self.rle_str, self.rle_str_start = rle_str, rle_str_start
        self.rle_counts, self.rle_counts_start = rle_counts, rle_counts_start
        self.kp_ref, self.kp_start, self.kp_values = kp_ref, kp_start, kp_values

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_annotations(self) -> int:
        return len(self.ann_ids)

    def nbytes(self) -> int:
        """Bytes held by the arrays (the whole index)."""
        return sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray))

    def position(self, image_id: int) -> int:
        """Row of ``image_id`` in the image arrays; ``KeyError`` when absent."""
        k = int(np.searchsorted(self.image_ids, image_id))
        if k == len(self.image_ids) or int(self.image_ids[k]) != image_id:
            raise KeyError(image_id)
        return k

    def file_name(self, pos: int) -> str:
        return self._names[self._name_start[pos]:self._name_start[pos + 1]].tobytes().decode("utf-8")

    def num_records(self, pos: int) -> int:
        return int(self.ann_start[pos + 1] - self.ann_start[pos])

    def has_non_crowd(self) -> np.ndarray:
        """``(num images,)`` bool: the image has at least one record with ``iscrowd == 0``."""
        counts = np.zeros(len(self.image_ids), dtype=np.int64)
        image_of = np.repeat(np.arange(len(self.image_ids)), np.diff(self.ann_start))
        np.add.at(counts, image_of[self.iscrowd == 0], 1)
        return counts > 0

    def _segmentation(self, row: int, height: int, width: int):
        kind, ref = int(self.seg_kind[row]), int(self.seg_ref[row])
        if kind == POLYGONS:
            first, last = int(self.poly_of_ann[ref]), int(self.poly_of_ann[ref + 1])
            polys = []
            for p in range(first, last):
                c = self.coords[self.poly_start[p]:self.poly_start[p + 1]]
                polys.append((c / _FIXED_POINT if c.dtype == np.int32 else c).tolist())
            return polys
        if kind == RLE_STRING:
            s = self.rle_str[self.rle_str_start[ref]:self.rle_str_start[ref + 1]].tobytes().decode("utf-8")
            return {"size": [height, width], "counts": s}
        counts = self.rle_counts[self.rle_counts_start[ref]:self.rle_counts_start[ref + 1]].tolist()
        return {"size": [height, width], "counts": counts}

    def _keypoints(self, row: int) -> Optional[List[float]]:
        ref = int(self.kp_ref[row])
        if ref < 0:
            return None
        return self.kp_values[self.kp_start[ref]:self.kp_start[ref + 1]].tolist()

    def records(self, pos: int) -> List[Dict[str, Any]]:
        """The records of the image at row ``pos``: ``[{"id", "label", "box", "segmentation", "area",
        "iscrowd", "keypoints"}]`` with Python values (``box`` a tuple of 4 floats x1y1x2y2, ``area``/``id`` None when the json
        had none)."""
        height, width = int(self.heights[pos]), int(self.widths[pos])
        out = []
        for row in range(int(self.ann_start[pos]), int(self.ann_start[pos + 1])):
            flags = int(self.flags[row])
            out.append({
                "id": int(self.ann_ids[row]) if flags & HAS_ID else None,
                "label": int(self.labels[row]),
                "box": tuple(self.boxes[row].tolist()),
                "segmentation": self._segmentation(row, height, width),
                "area": float(self.areas[row]) if flags & HAS_AREA else None,
                "iscrowd": int(self.iscrowd[row]),
                "keypoints": self._keypoints(row),
            })
        return out
