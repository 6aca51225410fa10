"""What a conditional model reads besides the image: a condition id per patch, or a label-map channel.

``model.condition`` (ModelConfig) says which:

- ``class``: the patch's class id (its position in ``store.classes``);
- ``modality``: the position of its modality in ``store.modalities`` (one model, one id per modality,
  so a CT model never renders microscopy);
- ``mask``: no id; the label map joins the image as one more channel, scaled to [0, 1] by the largest
  label, so the model learns image and mask jointly and generates aligned pairs;
- ``none``: nothing.

:func:`resolve_condition` turns ``auto`` into ``modality`` (several modalities) or ``none`` and fixes
the names (class, modality or label names) the model is trained with; they travel in every
checkpoint's model config, so generation and evaluation map ids to names without the store.
:func:`model_inputs` is the one reader of store rows for a model: every stage that feeds a model
real patches (training, validation, the prior fit, evaluation) reads them through it.
"""

from __future__ import annotations

import numpy as np

from medvae.data.store import PatchStore, read_rows
from medvae.errors import ConfigError

ID_CONDITIONS = ("class", "modality")  # conditions given to the model as an id (embedding)


def resolve_condition(kind: str, store: PatchStore) -> tuple[str, tuple[str, ...]]:
    """``(condition, names)`` of a model trained on ``store`` with ``model.condition = kind``."""
    if kind == "auto":
        kind = "modality" if len(store.modalities) > 1 else "none"
    if kind == "none":
        return kind, ()
    if kind == "modality":
        return kind, tuple(store.modalities)
    if kind == "class":
        if not store.classes:
            raise ConfigError(f"{store.path}: model.condition is 'class' but the store has no classes; prepare "
                              "an image set with class labels (IDX, npz, class folders) or use condition 'none'")
        return kind, tuple(store.classes)
    if store.labels is None:  # mask
        raise ConfigError(f"{store.path}: model.condition is 'mask' but the store has no label maps (labels.npy); "
                          "prepare it with --labels DIR or use condition 'none'")
    return kind, tuple(str(v) for v in range(int(np.max(store.labels)) + 1))


def condition_ids(store: PatchStore, rows, kind: str, names: tuple[str, ...]) -> np.ndarray | None:
    """int64 ids of ``rows`` for an id condition (None for ``none`` / ``mask``); names the model was trained
    with, so a store whose classes are ordered differently still maps correctly."""
    if kind not in ID_CONDITIONS:
        return None
    rows = np.asarray(rows, dtype=np.int64)
    column = "modality" if kind == "modality" else "class"
    if column not in store.index:
        raise ConfigError(f"{store.path}: no class column in index.csv; a class model needs a store with classes")
    values = store.index[column][rows]
    lut = {n: i for i, n in enumerate(names)}
    uniq, inverse = np.unique(values.astype(str), return_inverse=True)  # one lookup per distinct name
    known = np.asarray([lut.get(u, -1) for u in uniq.tolist()], dtype=np.int64)
    ids = known[inverse.reshape(-1)]
    if (known < 0).any():
        unknown = sorted(u for u, i in zip(uniq.tolist(), known) if i < 0)
        raise ConfigError(f"{store.path}: {kind} {unknown} unknown to the model (trained on {list(names)}); "
                          "evaluate on the store the model was trained on")
    return ids


def condition_counts(store: PatchStore, kind: str, names: tuple[str, ...], split: str = "train") -> np.ndarray:
    """Patches of ``split`` per condition id (all ones when the split is empty): the proportions a
    conditional model samples in unless asked for balance."""
    ids = condition_ids(store, store.select(split=split), kind, names)
    return np.bincount(ids, minlength=len(names)) if ids is not None and ids.size else np.ones(len(names))


def joint_channel(labels: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """Label maps ``(N, 1, H, W)`` uint8 -> the mask channel: float32 label / max label."""
    return labels.astype(np.float32) / max(len(names) - 1, 1)


def split_joint(x: np.ndarray, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A joint model's output ``(N, C + 1, H, W)`` -> images ``(N, C, H, W)`` and label maps
    ``(N, 1, H, W)`` uint8 (the mask channel rounded to the nearest label)."""
    top = max(len(names) - 1, 1)
    masks = np.clip(np.rint(np.asarray(x[:, -1:], dtype=np.float32) * top), 0, top).astype(np.uint8)
    return x[:, :-1], masks


def model_inputs(store: PatchStore, rows, model_config) -> tuple[np.ndarray, np.ndarray | None]:
    """What a model of ``model_config`` reads for store ``rows``: float32 inputs ``(N, C', H, W)`` in [0, 1]
    (the mask channel appended for a joint model) and the condition ids (or None)."""
    rows = np.asarray(rows, dtype=np.int64)
    x = store.get(rows)
    kind, names = model_config.condition, tuple(model_config.condition_names)
    if kind == "mask":
        x = np.concatenate([x, joint_channel(read_rows(store.labels, rows), names)], axis=1)
    return x, condition_ids(store, rows, kind, names)
