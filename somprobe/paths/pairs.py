"""Which inputs to join: same-class pairs, natural–adversarial pairs, or pairs from a table.

Pure numpy/pandas on labels and predictions; the job maps the returned positions to images.
Every function returns a DataFrame with one row per pair (``a``, ``b`` positions, ``class`` the
target) and a dict of counts saying what was skipped and why.

Same-class pairs are disjoint and prefix-stable: within each class the correctly classified
samples are taken in one seeded random order and paired two by two; pairs are listed in the
order their second sample appears, so the first 25 pairs of ``n_pairs=250`` are the pairs of
``n_pairs=25`` with the same seed.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import PathError

__all__ = ["pair_id", "same_class_pairs", "adversarial_pairs", "pairs_from_table", "PAIR_COLUMNS"]

#: Columns of the pair tables returned here.
PAIR_COLUMNS = ["a", "b", "class"]


def pair_id(id_a, id_b) -> str:
    """Stable id of a pair from its two sample ids (the same whatever order pairs are drawn in)."""
    return f"{id_a}~{id_b}"


def _rank_within(groups: np.ndarray) -> np.ndarray:
    """Rank of each element among the earlier elements of its group (0, 1, 2, ...)."""
    order = np.argsort(groups, kind="stable")
    g = groups[order]
    first = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1]
    starts = np.repeat(first, np.diff(np.r_[first, len(g)]))
    rank = np.empty(len(groups), dtype=np.int64)
    rank[order] = np.arange(len(g)) - starts
    return rank


def _check_n(n_pairs, available: int, what: str) -> None:
    if n_pairs is None:
        return
    if isinstance(n_pairs, bool) or not isinstance(n_pairs, (int, np.integer)) or n_pairs < 1:
        raise PathError(f"the number of pairs must be an integer >= 1, got {n_pairs!r}")
    if n_pairs > available:
        raise PathError(f"asked for {n_pairs} pairs but only {available} {what}; "
                        f"pass --pairs {available} or fewer" if available else
                        f"asked for {n_pairs} pairs but no {what.split(' exist')[0]} exist; "
                        "use another split or pair source")


def same_class_pairs(labels, preds, *, n_pairs: int | None = None, seed: int = 0
                     ) -> tuple[pd.DataFrame, dict]:
    """Disjoint pairs of correctly classified samples of the same class (study 001's setting).

    Parameters
    ----------
    labels, preds : array of int [n]
        True labels and the model's predictions of the pool; samples with a negative label or a
        wrong prediction are skipped (and counted).
    n_pairs : int, optional
        How many pairs; default all there are.
    seed : int
        Seeds the order.

    Returns
    -------
    pairs : DataFrame
        ``a``, ``b`` (positions in the pool), ``class``.
    counts : dict
        ``samples``, ``misclassified`` (skipped), ``unlabelled`` (skipped), ``available`` pairs.

    Raises
    ------
    PathError
        ``n_pairs`` is larger than the number of pairs that exist (the message says how many).
    """
    labels, preds = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    if labels.shape != preds.shape:
        raise PathError(f"labels ({labels.shape}) and predictions ({preds.shape}) differ in length")
    unlabelled = labels < 0
    correct = ~unlabelled & (labels == preds)
    order = np.random.default_rng(seed).permutation(len(labels))
    order = order[correct[order]]
    cls = labels[order]
    rank = _rank_within(cls)
    # The second sample of each pair, its partner just before it in its class's order.
    second = np.flatnonzero(rank % 2 == 1)
    by_class = np.argsort(cls, kind="stable")
    where = np.empty(len(cls), dtype=np.int64)
    where[by_class] = np.arange(len(cls))
    a = order[by_class[where[second] - 1]]
    b = order[second]
    counts = {"samples": int(len(labels)), "misclassified": int((~unlabelled & ~correct).sum()),
              "unlabelled": int(unlabelled.sum()), "available": int(len(b))}
    _check_n(n_pairs, len(b), f"same-class pairs of correctly classified samples exist "
                              f"({int(correct.sum())} correct of {len(labels)}, "
                              f"{counts['misclassified']} misclassified skipped)")
    k = len(b) if n_pairs is None else int(n_pairs)
    df = pd.DataFrame({"a": a[:k], "b": b[:k], "class": cls[second][:k]})
    return df, counts


def adversarial_pairs(clean_labels, clean_preds, adv_labels, adv_preds, *,
                      n_pairs: int | None = None, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """Natural–adversarial pairs (study 000): a clean image of class ``c`` and a perturbed image
    the model predicts as ``c``, although it came from another class.

    Parameters
    ----------
    clean_labels, clean_preds : array of int [n]
        The clean pool; only correctly classified samples are used.
    adv_labels, adv_preds : array of int [m]
        Labels the attack moved away from and predictions on the perturbed images; only
        successful ones (prediction ≠ label) are used.
    n_pairs : int, optional
        How many pairs; default one per usable perturbed image.
    seed : int
        Seeds the order of perturbed images and which clean partner each gets.

    Returns
    -------
    pairs : DataFrame
        ``a`` (clean position), ``b`` (perturbed position), ``class`` (= the perturbed prediction).
    counts : dict
        ``perturbed``, ``unsuccessful`` (skipped), ``no_clean_partner`` (skipped: no correctly
        classified clean image of the predicted class), ``available``.

    Raises
    ------
    PathError
        No usable perturbed image, or ``n_pairs`` larger than what exists.
    """
    cl, cp = np.asarray(clean_labels, dtype=np.int64), np.asarray(clean_preds, dtype=np.int64)
    al, ap = np.asarray(adv_labels, dtype=np.int64), np.asarray(adv_preds, dtype=np.int64)
    rng = np.random.default_rng(seed)
    clean_order = rng.permutation(len(cl))
    clean_order = clean_order[(cl[clean_order] >= 0) & (cl[clean_order] == cp[clean_order])]
    clean_cls = cl[clean_order]
    by_class = np.argsort(clean_cls, kind="stable")
    sorted_cls = clean_cls[by_class]
    success = ap != al
    has_partner = np.isin(ap, sorted_cls)
    usable = success & has_partner
    order = rng.permutation(len(al))
    order = order[usable[order]]
    cls = ap[order]
    rank = _rank_within(cls)
    # Round-robin over the class's clean images: distinct partners while they last.
    first = np.searchsorted(sorted_cls, cls, side="left")
    n_c = np.searchsorted(sorted_cls, cls, side="right") - first
    a = clean_order[by_class[first + rank % np.maximum(n_c, 1)]]
    counts = {"perturbed": int(len(al)), "unsuccessful": int((~success).sum()),
              "no_clean_partner": int((success & ~has_partner).sum()), "available": int(len(order))}
    if not len(order):
        raise PathError(f"no usable perturbed image: {counts['unsuccessful']} of {len(al)} were not "
                        f"misclassified and {counts['no_clean_partner']} have no correctly "
                        "classified clean image of their predicted class; run a stronger attack "
                        "(e.g. larger --eps) or use --pair-source same-class")
    _check_n(n_pairs, len(order), "natural–adversarial pairs exist")
    k = len(order) if n_pairs is None else int(n_pairs)
    return pd.DataFrame({"a": a[:k], "b": order[:k], "class": cls[:k]}), counts


def pairs_from_table(table: pd.DataFrame, ids, labels, preds) -> tuple[pd.DataFrame, dict]:
    """Pairs given by sample ids (columns ``id_a``, ``id_b``, optional ``class``).

    Pairs whose ends have different labels, or an end the model misclassifies (as the target),
    are kept in the returned table with a ``status`` saying why and are not to be used.

    Parameters
    ----------
    table : DataFrame
        ``id_a``, ``id_b`` and optionally ``class`` (the target; default the label of ``id_a``).
    ids : sequence of str
        Ids of the pool, in position order.
    labels, preds : array of int
        Labels and predictions of the pool.

    Returns
    -------
    pairs : DataFrame
        ``a``, ``b``, ``class``, ``status`` (``"ok"`` or the reason it is skipped).
    counts : dict
        ``given``, ``different_class``, ``misclassified``, ``available`` (ok pairs).

    Raises
    ------
    PathError
        Missing columns, ids not in the pool, or no usable pair.
    """
    missing = [c for c in ("id_a", "id_b") if c not in table.columns]
    if missing:
        raise PathError(f"pair table lacks column(s) {missing}; it needs id_a, id_b (and optionally class)")
    index = pd.Index([str(i) for i in ids])
    a = index.get_indexer(table["id_a"].astype(str))
    b = index.get_indexer(table["id_b"].astype(str))
    unknown = [str(v) for v, i in zip(pd.concat([table["id_a"], table["id_b"]]), np.r_[a, b]) if i < 0]
    if unknown:
        raise PathError(f"{len(unknown)} pair ids are not in the split (e.g. {unknown[:3]}); ids must "
                        "be sample ids of the split the pairs are drawn from (see pairs.csv of an "
                        "earlier connect run)")
    labels, preds = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    target = (table["class"].to_numpy(dtype=np.int64) if "class" in table.columns else labels[a])
    status = np.full(len(table), "ok", dtype=object)
    diff = (labels[a] != labels[b]) | (labels[a] != target)
    mis = ~diff & ((preds[a] != target) | (preds[b] != target))
    status[mis] = "an end is misclassified"
    status[diff] = "ends of different classes"
    counts = {"given": int(len(table)), "different_class": int(diff.sum()),
              "misclassified": int(mis.sum()), "available": int((status == "ok").sum())}
    if counts["available"] == 0:
        raise PathError(f"none of the {len(table)} pairs in the table is usable: "
                        f"{counts['different_class']} join different classes, "
                        f"{counts['misclassified']} have a misclassified end")
    return pd.DataFrame({"a": a, "b": b, "class": target, "status": status}), counts
