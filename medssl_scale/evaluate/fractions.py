"""Label fractions and validation splits drawn by patient: seeded, stratified, a patient's images together.

Stratum of a patient (one per patient, from its images' labels):
  multiclass  the most frequent label among its images (ties: the smaller class index);
  multilabel  its rarest positive label, rarest = fewest positive patients in the pool (ties: the smaller
              label index), or the extra stratum "(none)" for a patient with no positive label.
The multilabel rule protects rare conditions: every label with a positive patient in the pool is some
patient's stratum, so a drawn fraction keeps at least one positive patient of every label.

Draw order: patients are sorted by id, each stratum's patients (in that order) are permuted with
``np.random.default_rng(seed).permutation``, strata in index order, and a stratum contributes a prefix of
its permutation. The result therefore depends only on the seed and the (patient, labels) content, not on
the order of the images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from medssl_scale.evaluate.arrays import class_names, multiclass_labels, multilabel_labels, patient_index, to_numpy
from medssl_scale.evaluate.errors import FractionError

NONE_STRATUM = "(none)"


@dataclass(frozen=True)
class _Pool:
    ids: np.ndarray            # (P,) sorted patient ids
    pidx: np.ndarray           # (N,) patient index of each image
    stratum: np.ndarray        # (P,) stratum index of each patient
    strata: list[str]          # stratum names (classes, then "(none)" for multilabel)
    class_images: np.ndarray   # (N, C) bool: image labelled / positive for class c
    stratum_images: np.ndarray  # (P,) images of the patient that count for its stratum
    classes: list[str]


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def _pool(patient_ids: Any, labels: Any, names: Sequence[str] | None) -> _Pool:
    raw = to_numpy(labels)
    ids, pidx = patient_index(patient_ids, raw.shape[0] if raw.ndim else -1)
    n_patients = ids.shape[0]
    if raw.ndim == 1:
        y = multiclass_labels(raw)
        n_classes = len(names) if names is not None else int(y.max()) + 1
        if y.max() >= n_classes:
            raise FractionError(f"label {int(y.max())} is out of range for {n_classes} class names")
        classes = class_names(names, n_classes)
        counts = np.bincount(pidx * n_classes + y, minlength=n_patients * n_classes).reshape(n_patients, -1)
        stratum = np.argmax(counts, axis=1)
        stratum_images = counts[np.arange(n_patients), stratum]
        class_images = y[:, None] == np.arange(n_classes)[None, :]
        return _Pool(ids, pidx, stratum, list(classes), class_images, stratum_images, list(classes))
    y = multilabel_labels(raw)
    n_labels = y.shape[1]
    classes = class_names(names, n_labels, "label")
    class_images = y == 1                                                              # NaN compares False
    pos_images = np.zeros((n_patients, n_labels), dtype=np.int64)
    np.add.at(pos_images, pidx, class_images.astype(np.int64))
    positive = pos_images > 0
    rarity = np.where(positive, positive.sum(axis=0)[None, :], np.iinfo(np.int64).max)
    stratum = np.where(positive.any(axis=1), np.argmin(rarity, axis=1), n_labels)
    images_per_patient = np.bincount(pidx, minlength=n_patients)
    padded = np.concatenate([pos_images, images_per_patient[:, None]], axis=1)
    stratum_images = padded[np.arange(n_patients), stratum]
    return _Pool(ids, pidx, stratum, list(classes) + [NONE_STRATUM], class_images, stratum_images, list(classes))


def _apportion(total: int, sizes: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Split total over strata in proportion to sizes, each within [lo, hi], by largest remainder (exact sum)."""
    quota = total * sizes / sizes.sum()
    k = np.clip(np.floor(quota).astype(np.int64), lo, hi)
    while k.sum() < total:
        gap = np.where(k < hi, quota - k, -np.inf)
        k[int(np.argmax(gap))] += 1
    while k.sum() > total:
        gap = np.where(k > lo, k - quota, -np.inf)
        k[int(np.argmax(gap))] -= 1
    return k


def _permuted_strata(pool: _Pool, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.permutation(np.flatnonzero(pool.stratum == s)) for s in range(len(pool.strata))]


@dataclass(frozen=True)
class FractionSample:
    """The drawn labelled subset, with its exact counts.

    indices: sorted image indices (M,) into the arrays given; patients: the drawn patient ids, sorted.
    per_class: class -> {"stratum_patients": drawn patients of that stratum, "patients": drawn patients with
    at least one image of (multilabel: positive for) the class, "images": drawn images of / positive for it}.
    n_pool_*: the training split the subset was drawn from. unprotected_classes: classes with images in the
    pool that are no patient's stratum (multiclass: never a patient's most frequent label), hence not
    guaranteed a drawn patient; empty for one-diagnosis-per-patient data.
    """

    indices: np.ndarray
    patients: tuple[str, ...]
    n_patients: int
    n_images: int
    per_class: dict[str, dict[str, int]]
    n_pool_patients: int
    n_pool_images: int
    label_fraction: float | None = None
    labels_per_class: int | None = None
    seed: int = 0
    unprotected_classes: tuple[str, ...] = field(default=())

    def summary(self) -> dict[str, Any]:
        """JSON-ready counts (for metrics.json and the log)."""
        return {"label_fraction": self.label_fraction, "labels_per_class": self.labels_per_class,
                "seed": self.seed, "n_patients": self.n_patients, "n_images": self.n_images,
                "n_pool_patients": self.n_pool_patients, "n_pool_images": self.n_pool_images,
                "per_class": self.per_class, "unprotected_classes": list(self.unprotected_classes)}


def _sample(pool: _Pool, chosen: np.ndarray, **meta: Any) -> FractionSample:
    chosen = np.sort(chosen)
    take = np.zeros(pool.ids.shape[0], dtype=bool)
    take[chosen] = True
    image_mask = take[pool.pidx]
    indices = np.flatnonzero(image_mask)
    per_class = {}
    drawn_strata = np.bincount(pool.stratum[chosen], minlength=len(pool.strata))
    for c, name in enumerate(pool.classes):
        imgs = pool.class_images[:, c] & image_mask
        per_class[name] = {"stratum_patients": int(drawn_strata[c]),
                           "patients": int(np.unique(pool.pidx[imgs]).size),
                           "images": int(imgs.sum())}
    if len(pool.strata) > len(pool.classes):  # multilabel: patients with no positive label
        none_images = (pool.stratum[pool.pidx] == len(pool.classes)) & image_mask
        per_class[NONE_STRATUM] = {"stratum_patients": int(drawn_strata[-1]), "patients": int(drawn_strata[-1]),
                                   "images": int(none_images.sum())}
    has_images = pool.class_images.any(axis=0)
    pool_strata = np.bincount(pool.stratum, minlength=len(pool.strata))
    unprotected = tuple(name for c, name in enumerate(pool.classes) if has_images[c] and pool_strata[c] == 0)
    return FractionSample(indices=indices, patients=tuple(pool.ids[chosen].tolist()), n_patients=int(chosen.size),
                          n_images=int(indices.size), per_class=per_class, n_pool_patients=int(pool.ids.shape[0]),
                          n_pool_images=int(pool.pidx.shape[0]), unprotected_classes=unprotected, **meta)


def sample_label_fraction(patient_ids: Any, labels: Any, *, label_fraction: float | None = None,
                          labels_per_class: int | None = None, seed: int = 0,
                          names: Sequence[str] | None = None) -> FractionSample:
    """Draw a labelled subset of the training split by patient, stratified; exactly one of the two sizes.

    patient_ids (N,) strings; labels (N,) int64 (multiclass) or (N, L) float with NaN (multilabel).
    label_fraction f in (0, 1]: round(f * P) of the P training patients (half rounds up), apportioned over
    the strata in proportion to their patient counts by largest remainder, every non-empty stratum keeping
    at least one patient. Fewer patients than non-empty strata raises FractionError.
    labels_per_class k >= 1: from each stratum, patients in their drawn order until the stratum's class has
    at least k images among them (multilabel: k positive images; "(none)": k images), or the whole stratum
    if it has fewer; the last patient's other images come along, so counts can exceed k.
    """
    if (label_fraction is None) == (labels_per_class is None):
        raise FractionError("give exactly one of label_fraction and labels_per_class")
    pool = _pool(patient_ids, labels, names)
    sizes = np.bincount(pool.stratum, minlength=len(pool.strata))
    nonempty = sizes > 0
    order = _permuted_strata(pool, seed)
    n_patients = pool.ids.shape[0]
    if label_fraction is not None:
        f = float(label_fraction)
        if not 0.0 < f <= 1.0:
            raise FractionError(f"label_fraction must be in (0, 1], got {label_fraction}")
        total = _round_half_up(f * n_patients)
        n_strata = int(nonempty.sum())
        if total < n_strata:
            least = (n_strata - 0.5) / n_patients
            raise FractionError(
                f"label_fraction={f:g} keeps {total} of {n_patients} training patients, fewer than the "
                f"{n_strata} classes that need one each; use label_fraction >= {np.ceil(least * 1e4) / 1e4:g} "
                f"or labels_per_class=1")
        k = _apportion(total, sizes, nonempty.astype(np.int64), sizes)
        chosen = np.concatenate([perm[:k[s]] for s, perm in enumerate(order)])
        return _sample(pool, chosen, label_fraction=f, seed=seed)
    if isinstance(labels_per_class, bool) or int(labels_per_class) != labels_per_class or labels_per_class < 1:
        raise FractionError(f"labels_per_class must be an integer >= 1, got {labels_per_class}")
    kpc = int(labels_per_class)
    chosen = []
    for perm in order:
        if perm.size:
            reached = np.cumsum(pool.stratum_images[perm]) >= kpc
            stop = int(np.argmax(reached)) + 1 if reached.any() else perm.size
            chosen.append(perm[:stop])
    return _sample(pool, np.concatenate(chosen), labels_per_class=kpc, seed=seed)


@dataclass(frozen=True)
class ValidationSplit:
    """A patient-disjoint split of the training split: image indices (sorted) into the arrays given."""

    train: np.ndarray
    val: np.ndarray
    n_train_patients: int
    n_val_patients: int

    def summary(self) -> dict[str, int]:
        return {"n_train_patients": self.n_train_patients, "n_train_images": int(self.train.size),
                "n_val_patients": self.n_val_patients, "n_val_images": int(self.val.size)}


def split_validation(patient_ids: Any, labels: Any, *, val_fraction: float = 0.1, seed: int = 0,
                     names: Sequence[str] | None = None) -> ValidationSplit:
    """Hold out round(val_fraction * P) training patients (half up) as validation, grouped and stratified.

    For shards without a validation split. Patients are stratified as for label fractions, the held-out
    count apportioned over strata by largest remainder, and every stratum keeps at least one training
    patient; FractionError if that leaves no validation patient or cannot be met.
    """
    f = float(val_fraction)
    if not 0.0 < f < 1.0:
        raise FractionError(f"val_fraction must be in (0, 1), got {val_fraction}")
    pool = _pool(patient_ids, labels, names)
    sizes = np.bincount(pool.stratum, minlength=len(pool.strata))
    n_patients = pool.ids.shape[0]
    total = _round_half_up(f * n_patients)
    spare = int(np.maximum(sizes - 1, 0).sum())
    if total < 1:
        raise FractionError(f"val_fraction={f:g} of {n_patients} patients holds out none; raise val_fraction")
    if total > spare:
        raise FractionError(f"val_fraction={f:g} needs {total} validation patients but only {spare} of "
                            f"{n_patients} can be held out while every class keeps a training patient")
    k = _apportion(total, sizes, np.zeros_like(sizes), np.maximum(sizes - 1, 0))
    order = _permuted_strata(pool, seed)
    val_patients = np.zeros(n_patients, dtype=bool)
    val_patients[np.concatenate([perm[:k[s]] for s, perm in enumerate(order)])] = True
    is_val = val_patients[pool.pidx]
    return ValidationSplit(train=np.flatnonzero(~is_val), val=np.flatnonzero(is_val),
                           n_train_patients=int(n_patients - total), n_val_patients=int(total))
