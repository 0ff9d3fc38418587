"""A fitted codec: transform + quantizer (+ optional higher-precision rescoring codes)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from nestvec.compression.base import Quantizer, Transform
from nestvec.errors import FailedPreconditionError, invalid
from nestvec.fsutil import load_npy, read_json, save_npy, write_json

CODEC_FORMAT_VERSION = 1
BLOCK_ROWS = 16384


def top_columns(scores: np.ndarray, positions: np.ndarray, wide: int) -> tuple[np.ndarray, np.ndarray]:
    """The best `wide` columns per row (unordered); -1 positions where scores are -inf."""
    if wide < scores.shape[1]:
        top = np.argpartition(-scores, wide - 1, axis=1)[:, :wide]
        scores, positions = np.take_along_axis(scores, top, axis=1), np.take_along_axis(positions, top, axis=1)
    return scores, np.where(np.isfinite(scores), positions, -1)


class IdFilter:
    """Which ids a scan may return, as a faiss selector over id bitmaps: those set in `keep`
    (none past its end), minus those set in `drop` (none past its end)."""

    def __init__(self, keep: np.ndarray | None = None, drop: np.ndarray | None = None) -> None:
        self._parts: list[Any] = []  # the bitmaps and inner selectors the selector points into
        if keep is not None:
            mask = np.asarray(keep, dtype=bool)
            if drop is not None and len(drop):
                mask = mask.copy()
                shared = min(len(mask), len(drop))
                mask[:shared] &= ~drop[:shared]
            self.selector: Any = self._bitmap(mask)
        elif drop is not None and len(drop):
            self.selector = faiss.IDSelectorNot(self._bitmap(np.asarray(drop, dtype=bool)))
        else:
            self.selector = None

    def _bitmap(self, mask: np.ndarray) -> Any:
        bits = np.packbits(mask, bitorder="little")  # padded with zeros to whole bytes
        selector = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))  # its size is in bytes
        self._parts += [bits, selector]
        return selector


class ListScan:
    """One query's best `wide` (score, id) over blocks of codes, each scored where it lies (a
    posting list stays in LMDB's map, never copied) by faiss's IVF list scanner, which keeps the
    heap as it goes: a SPANN query on 100k wiki250k vectors (int8, ~45 lists) took 0.7 ms against
    1.26 ms when its lists were first copied into a faiss index's code buffer and scanned there."""

    def __init__(self, scanner: Any, query: np.ndarray, offset: float, wide: int, code_size: int,
                 keep_alive: Any) -> None:
        self._scanner, self._keep_alive = scanner, keep_alive  # the scanner points into both
        self._query = np.ascontiguousarray(query, dtype=np.float32)
        self._offset, self._wide, self._code_size = offset, wide, code_size
        self._scores = np.full(wide, -np.inf, dtype=np.float32)
        self._ids = np.full(wide, -1, dtype=np.int64)
        self._heap = (faiss.swig_ptr(self._scores), faiss.swig_ptr(self._ids))
        scanner.set_query(faiss.swig_ptr(self._query))
        scanner.set_list(0, 0.0)  # no residuals: scores are plain inner products

    def add(self, ids: np.ndarray, codes: np.ndarray) -> None:
        """Score one block: codes [n, code_size] uint8 and their int64 ids, both C-contiguous."""
        if not len(ids):
            return
        if (codes.dtype != np.uint8 or codes.shape != (len(ids), self._code_size) or ids.dtype != np.int64
                or not codes.flags.c_contiguous or not ids.flags.c_contiguous):
            raise invalid("codes", f"expected uint8 ({len(ids)}, {self._code_size}) and int64 ids, contiguous; "
                                   f"got {codes.dtype} {codes.shape} and {ids.dtype}")
        self._scanner.scan_codes(len(ids), faiss.swig_ptr(codes), faiss.swig_ptr(ids), *self._heap, self._wide)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) [wide], best first; -inf and -1 where fewer passed."""
        order = np.argsort(-self._scores, kind="stable")
        scores, ids = self._scores[order], self._ids[order]
        return scores + np.float32(self._offset), np.where(np.isfinite(scores), ids, -1)


def _best_first(scores: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by descending score (a heap or a partition leaves them in no order)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(positions, order, axis=1)


class Codec:
    """Vectors -> fixed-size uint8 codes, and float queries scored against codes in blocks."""

    def __init__(self, spec: str, dim: int, transform: Transform, quantizer: Quantizer,
                 rescore: Codec | None = None) -> None:
        self.spec, self.dim = spec, dim
        self.transform, self.quantizer, self.rescore = transform, quantizer, rescore
        self._scratch = threading.local()  # per thread: a faiss index whose ranges list scans read

    # -- sizes -------------------------------------------------------------------------------
    @property
    def bytes_per_vector(self) -> int:
        """Bytes scanned per vector at search time (what sits in RAM)."""
        return self.quantizer.code_size

    @property
    def stored_bytes_per_vector(self) -> int:
        """Scanned codes plus rescoring codes kept on disk."""
        return self.bytes_per_vector + (self.rescore.bytes_per_vector if self.rescore else 0)

    @property
    def fitted(self) -> bool:
        parts_fitted = self.transform.fitted and self.quantizer.fitted
        return parts_fitted and (self.rescore is None or self.rescore.fitted)

    @property
    def min_fit_size(self) -> int:
        """Fewest vectors a fit may use: PCA needs its dimension, per-dimension ranges need a sample."""
        own = max(self.transform.min_fit_size, self.quantizer.min_fit_size, 1)
        return max(own, self.rescore.min_fit_size) if self.rescore else own

    # -- fit / encode / decode -----------------------------------------------------------------
    def fit(self, sample: np.ndarray) -> Codec:
        x = self._check(sample, "sample")
        if len(x) < self.min_fit_size:
            raise FailedPreconditionError(
                f"codec: {self.spec} needs at least {self.min_fit_size} vectors to fit, got {len(x)}")
        self.transform.fit(x)
        self.quantizer.fit(self.transform.apply_documents(x))
        self._scratch = threading.local()
        if self.rescore is not None:
            self.rescore.fit(x)
        return self

    def _check(self, x: np.ndarray, field: str) -> np.ndarray:
        arr = np.asarray(x, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise invalid(field, f"expected shape (n, {self.dim}), got {arr.shape}")
        return np.ascontiguousarray(arr)

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise FailedPreconditionError(f"codec {self.spec!r} is not fitted yet: call fit(sample) first")

    def encode(self, x: np.ndarray) -> np.ndarray:
        self._require_fitted()
        return self.quantizer.encode(self.transform.apply_documents(self._check(x, "vectors")))

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Approximate vectors in the coded space (after PCA / prefix)."""
        return self.quantizer.decode(self._check_codes(codes))

    def reconstruct(self, codes: np.ndarray) -> np.ndarray:
        """Approximate input-space vectors (what re-clustering needs when a posting list splits)."""
        return self.transform.inverse(self.decode(codes))

    def _check_codes(self, codes: np.ndarray) -> np.ndarray:
        arr = np.asarray(codes)
        if arr.dtype != np.uint8 or arr.ndim != 2 or arr.shape[1] != self.bytes_per_vector:
            raise invalid("codes", f"expected uint8 (n, {self.bytes_per_vector}), got {arr.dtype} {arr.shape}")
        return arr

    # -- scoring -------------------------------------------------------------------------------
    def prepare_queries(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._require_fitted()
        return self.transform.apply_queries(self._check(queries, "queries"))

    def iter_scores(self, queries: np.ndarray, codes: np.ndarray,
                    block_rows: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """(start row, scores [nq, block]) per block; only one block is ever decoded at a time."""
        prepared, offset = self.prepare_queries(queries)
        codes = self._check_codes(codes)
        for start in range(0, len(codes), block_rows):
            block = self.quantizer.block_scores(prepared, codes[start:start + block_rows])
            yield start, block + offset[:, None]

    def scores(self, queries: np.ndarray, codes: np.ndarray, block_rows: int = BLOCK_ROWS) -> np.ndarray:
        """Approximate inner products [nq, n] of float queries with coded vectors."""
        out = np.empty((len(queries), len(codes)), dtype=np.float32)
        for start, block in self.iter_scores(queries, codes, block_rows):
            out[:, start:start + block.shape[1]] = block
        return out

    def scores_parts(self, queries: np.ndarray, parts: Sequence[np.ndarray], block_rows: int = 512) -> np.ndarray:
        """Scores [nq, sum of rows] against several blocks of codes (posting lists) without first
        concatenating them. Small blocks keep each block's float32 copy in cache: measured on
        16,000 int8 codes of 384 dims, 0.84 ms in blocks of a list (~250 rows) against 1.7 ms in 2,048-row
        blocks and 3.8 ms through faiss's QT_8bit scan (which also needs the codes copied in)."""
        prepared, offset = self.prepare_queries(queries)
        score = self.quantizer.scorer(prepared)  # returns [rows, nq]
        out = np.empty((sum(len(part) for part in parts), len(queries)), dtype=np.float32)
        at = 0
        for part in parts:
            if part.dtype != np.uint8 or part.ndim != 2 or part.shape[1] != self.bytes_per_vector:
                part = self._check_codes(part)
            for start in range(0, len(part), block_rows):
                block = part[start:start + block_rows]
                out[at:at + len(block)] = score(block)
                at += len(block)
        return np.ascontiguousarray(out.T) + offset[:, None]

    def top_parts(self, queries: np.ndarray, parts: Sequence[np.ndarray], wide: int,
                  keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Best `wide` (scores, positions) [nq, <= wide] over the rows of `parts` taken in order,
        only rows where `keep` is True; positions index their concatenation, -1 where fewer pass.
        Best first in each row (the planner ranks by it). Through list_scan where faiss reads our
        codes, numpy otherwise."""
        total = sum(len(part) for part in parts)
        if not total:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        heap = min(wide, total)
        positions = np.arange(total, dtype=np.int64)
        if self._scan_index() is None:
            scores = self.scores_parts(queries, parts)
            if keep is not None:
                scores[:, ~keep] = -np.inf
            return _best_first(*top_columns(scores, np.broadcast_to(positions, scores.shape), wide))
        only = None if keep is None else IdFilter(keep=np.asarray(keep, dtype=bool))
        out_scores = np.full((len(queries), heap), -np.inf, dtype=np.float32)
        out_rows = np.full((len(queries), heap), -1, dtype=np.int64)
        for qi in range(len(queries)):
            scan = self.list_scan(queries[qi:qi + 1], heap, only)
            assert scan is not None
            at = 0
            for part in parts:
                scan.add(positions[at:at + len(part)], part)
                at += len(part)
            out_scores[qi], out_rows[qi] = scan.result()
        return out_scores, out_rows

    def list_scan(self, query: np.ndarray, wide: int, only: IdFilter | None = None) -> ListScan | None:
        """A running top-`wide` for one query [1, dim] over blocks of codes added one by one (a
        SPANN query's posting lists), or None when faiss cannot read these codes."""
        index = self._scan_index()
        if index is None:
            return None
        prepared, offset = self.prepare_queries(query)
        prepared, shift = self.quantizer.faiss_queries(prepared)
        selector = None if only is None else only.selector
        if isinstance(index, faiss.IndexScalarQuantizer):
            sq: Any = index.sq  # faiss's stubs lack the scanner factory its SWIG module has
            scanner = sq.select_InvertedListScanner(faiss.METRIC_INNER_PRODUCT, None, False, selector, False)
        else:  # fp32: IndexIVFFlat's scanner reads float32 rows; its IVF is only the factory, kept per thread
            ivf = getattr(self._scratch, "ivf", None)
            if ivf is None:
                ivf = self._scratch.ivf = faiss.IndexIVFFlat(index, index.d, 1, faiss.METRIC_INNER_PRODUCT)
            scanner = ivf.get_InvertedListScanner(False, selector, None)
        return ListScan(scanner, prepared[0], float(offset[0] + shift[0]), wide, self.bytes_per_vector,
                        keep_alive=(index, only))

    def _scan_index(self) -> Any:
        """This thread's faiss index over our codes (None when faiss cannot read them); it owns
        the trained ranges its scanners point into."""
        index = getattr(self._scratch, "index", None)
        if index is None and self.fitted:
            index = self.quantizer.faiss_index()
            self._scratch.index = index
        return index

    def candidate_scores(self, queries: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Scores [nq, c] of each query against its own c candidates, given as codes [nq, c, code_size]."""
        prepared, offset = self.prepare_queries(queries)
        nq, c, size = codes.shape
        decoded = self.quantizer.decode(self._check_codes(codes.reshape(nq * c, size))).reshape(nq, c, -1)
        return np.einsum("qcd,qd->qc", decoded, prepared) + offset[:, None]

    # -- persistence ---------------------------------------------------------------------------
    def state(self) -> dict[str, object]:
        return {"spec": self.spec, "dim": self.dim, "fitted": self.fitted, "version": CODEC_FORMAT_VERSION}

    def save(self, folder: Path | str) -> None:
        """Arrays first, manifest last (atomically): a crash leaves the previous manifest intact."""
        folder = Path(folder)
        manifest: dict[str, object] = self.state()
        for prefix, stage in self._stages():
            config, arrays = stage.state()
            manifest[prefix] = config
            for key, array in arrays.items():
                save_npy(folder / f"{prefix}.{key}.npy", array)
        write_json(folder / "codec.json", manifest)

    def _stages(self) -> list[tuple[str, Transform | Quantizer]]:
        stages: list[tuple[str, Transform | Quantizer]] = [
            ("transform", self.transform), ("quantizer", self.quantizer)]
        if self.rescore is not None:
            stages += [(f"rescore.{p}", s) for p, s in self.rescore._stages()]
        return stages

    @classmethod
    def load(cls, folder: Path | str) -> Codec:
        from nestvec.compression.factory import make_codec

        folder = Path(folder)
        manifest = read_json(folder / "codec.json")
        if int(manifest.get("version", 0)) > CODEC_FORMAT_VERSION:
            raise FailedPreconditionError(f"codec format {manifest['version']} is newer than this nestvec")
        codec = make_codec(str(manifest["spec"]), int(manifest["dim"]))
        if manifest.get("fitted"):
            for prefix, stage in codec._stages():
                arrays = {p.name[len(prefix) + 1:-4]: load_npy(p) for p in folder.glob(f"{prefix}.*.npy")
                          if p.name[len(prefix) + 1:-4].count(".") == 0}
                stage.load_state(dict(manifest.get(prefix) or {}), arrays)
        return codec
