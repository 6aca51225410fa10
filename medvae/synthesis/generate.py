"""Synthetic datasets: decode prior samples or variants of real images, audit them for memorization,
write physical units.

Output of ``generate(RUN, OUT, config)``::

    OUT/synthetic/<modality>/<id>.nii.gz   CT (and MR): int16 HU, NIfTI, LPS voxel axes (X, Y, 1)
    OUT/synthetic/<modality>/<id>.tif      microscopy: uint16 ImageJ TIFF, µm pixel size
    OUT/synthetic/<modality>/<id>.png      8-bit preview (the store's window / normalization)
    OUT/manifest.csv                       one row per sample (MANIFEST_COLUMNS)
    OUT/generation.json                    parameters, counts, audit thresholds, timings
    OUT/audit.png                          sample vs real nearest-neighbour distance histograms
    OUT/augmented_store/                   with mix_with: real patches + synthetic ones

``generate`` runs four steps per batch of samples: decode (prior latents through the model),
audit (nearest training patch, ``medvae.synthesis.audit``), write (the sample's files, ``medvae.io.writers``,
and its manifest row) and augment (collect unflagged samples for the augmented store).

Anchored synthesis (``anchors=STORE`` with ``synthesis: neighbours | interpolate``,
:mod:`medvae.synthesis.anchored`): sample ``i`` is variant ``i mod K`` of the ``i // K``-th image of
the store's split (K = ``per_image``), decoded with its anchor's class or modality id; its ``class``
is the anchor's and ``source_row`` the anchor's row in that store (provenance).

Reproducibility: sample ``i``'s latent and condition depend only on ``(seed, i)``
(:mod:`medvae.synthesis.sampling`), so the batch size, the device and ``n`` do not change which latent a
sample gets; decoding on the same device with the same arguments gives byte-identical files (no
timestamps are written). The decoder runs in bf16 where the device has it (``amp: auto``,
:func:`medvae.training.runtime.resolve_amp`; float32 elsewhere), its images cast back to float32 before
they are audited or written; ``generation.json`` records the ``precision``.
Resumption: files are written atomically, so a file that exists is complete; a re-run with the
same arguments (checked against ``generation.json``) writes only the missing files.

Conditional models (``model.condition``, :mod:`medvae.data.conditions`): a modality model samples each
modality in proportion to the training split (``per_class``: balanced) and writes each sample in its
modality's units; a class model writes ``synthetic/<modality>/<class>/`` folders and a ``class`` column;
a joint image + mask model writes the label map beside each image (``<id>_mask``: NIfTI uint8 beside
the HU image, TIFF for microscopy; ``mask`` column), with identical geometry. An unconditional model's
sample takes the modality of its nearest training patch (pixel space).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medvae.config import GenerateConfig
from medvae.data.conditions import condition_counts, split_joint
from medvae.data.store import PatchStore, open_store, write_derived_store
from medvae.devices import select_device
from medvae.errors import InputError
from medvae.files import atomic_open, sha256_file, sha256_json, write_json
from medvae.models import require_latent
from medvae.synthesis import anchored, audit
from medvae.synthesis.prior import SamplingPrior, prior_for
from medvae.synthesis.sample_files import sample_files, write_sample
from medvae.synthesis.sampling import decode_latents, latents, sample_conditions
from medvae.training.rundir import RunDir
from medvae.training.runtime import precision_name, resolve_amp

log = logging.getLogger(__name__)
MANIFEST_COLUMNS = ("id", "modality", "class", "path", "mask", "preview", "seed", "checkpoint_sha256", "latent_norm",
                    "nearest_train_distance", "nearest_train_distance_features", "nearest_train_patient",
                    "flagged", "source_row")
PARAM_KEYS = ("checkpoint_sha256", "store_hash", "seed", "temperature", "format", "drop_flagged",
              "audit_percentile", "prior", "per_class", "synthesis", "per_image", "anchors_hash", "anchor_split",
              "neighbour_range", "posterior_temperature", "diffusion")
WRITE_THREADS = 4  # zlib / PNG encoding release the GIL: a batch's files are written in parallel


@contextlib.contextmanager
def _deterministic_cudnn():
    """cuDNN picks the same (deterministic) kernels every run; restored afterwards."""
    old = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old


@contextlib.contextmanager
def _timed(timings: dict[str, float], phase: str):
    """Add the seconds the block takes to ``timings[phase]``."""
    t = time.perf_counter()
    yield
    timings[phase] += time.perf_counter() - t


# --------------------------------------------------------------------------- inputs
def _open_anchors(path, model, config: GenerateConfig) -> anchored.Anchors:
    """The ``config.split`` images of the store at ``path``, encoded, with their neighbours in that split
    (of the same class for ``interpolate``)."""
    store = open_store(path)
    rows = store.select(split=config.split)
    if rows.size == 0:
        raise InputError(f"{store.path}: no patches in split '{config.split}' to anchor variants on; the store "
                         f"has {store.splits}")
    channels = int(store.meta["channels"]) + (model.config.condition == "mask")
    if store.patches.shape[2:] != (model.config.image_size,) * 2 or channels != model.config.in_channels:
        raise InputError(f"{store.path}: patches {tuple(store.patches.shape[1:])} do not fit the model "
                         f"({model.config.in_channels} channels, {model.config.image_size}²)")
    return anchored.Anchors.of(model, store, rows, config.per_image, same_class=config.synthesis == "interpolate")


@dataclass
class _Source:
    """What a generation reads: the model, the store it was trained on, the recorded parameters."""

    model: torch.nn.Module
    store: PatchStore
    device: torch.device
    params: dict
    prior: SamplingPrior | None = None
    anchors: anchored.Anchors | None = None

    @property
    def condition(self) -> tuple[str, tuple[str, ...]]:
        return self.model.config.condition, tuple(self.model.config.condition_names)

    @functools.cached_property
    def amp_dtype(self) -> torch.dtype | None:
        """The decoder's autocast dtype: bf16 where the device has it (``amp: auto``), else float32."""
        return resolve_amp("auto", self.device)

    @functools.cached_property
    def condition_counts(self) -> np.ndarray:
        return condition_counts(self.store, *self.condition)

    def condition_ids(self, start: int, stop: int) -> torch.Tensor | None:
        """Ids of samples ``start..stop-1`` for a class / modality model: balanced with ``per_class``,
        else in the training split's proportions."""
        if self.condition[0] not in ("class", "modality"):
            return None
        return sample_conditions(start, stop, self.condition_counts, balanced=self.params["per_class"])


def _load_model(path: Path, device: torch.device):
    from medvae.training.checkpoint import load_model

    model, meta = load_model(path, device=device, ema=True)
    require_latent(model)
    return model, meta


def _open_source(run: Path, config: GenerateConfig, device: str, anchors=None) -> _Source:
    """Load the checkpoint (EMA weights), its training store and the anchor store; the parameters of this
    generation."""
    if config.seed < 0:
        raise InputError(f"--seed {config.seed}: must be >= 0")
    dev = select_device(device)
    run_dir = RunDir(run)
    ckpt_path = run_dir.checkpoint(config.checkpoint)
    ckpt_sha = sha256_file(ckpt_path)
    model, meta = _load_model(ckpt_path, dev)
    model.eval()
    store = run_dir.store()
    if meta.get("store_hash") and meta["store_hash"] != store.content_hash:
        log.warning("%s: the store changed since %s was trained (hash differs)", store.path, ckpt_path.name)
    channels = int(store.meta["channels"]) + (model.config.condition == "mask")
    if int(model.config.in_channels) != channels:
        raise InputError(f"{ckpt_path}: the model makes {model.config.in_channels}-channel images but its "
                         f"store {store.path} has {channels} channels")
    params = {"run": str(run.resolve()), "checkpoint": str(ckpt_path.resolve()), "checkpoint_sha256": ckpt_sha,
              "store": str(store.path.resolve()), "store_hash": store.content_hash, "seed": config.seed,
              "n": config.n, "temperature": config.temperature, "format": config.format,
              "batch_size": config.batch_size, "drop_flagged": config.drop_flagged,
              "audit_percentile": config.audit_percentile, "prior": config.prior, "per_class": config.per_class,
              "diffusion": config.diffusion.model_dump(mode="json") if config.prior == "diffusion" else None}
    if config.per_class and model.config.condition not in ("class", "modality"):
        raise InputError(f"{ckpt_path}: --per-class needs a class- or modality-conditioned model (this one: "
                         f"condition {model.config.condition}); train with --condition class")
    if (config.synthesis == "prior") != (anchors is None):
        raise InputError(f"--synthesis {config.synthesis} " + ("needs --from STORE: the images to vary"
                                                               if anchors is None else "takes no --from store"))
    if anchors is not None:
        src_anchors = _open_anchors(anchors, model, config)
        params.update(n=len(src_anchors), anchors=str(src_anchors.store.path.resolve()),
                      anchors_hash=src_anchors.store.content_hash, anchor_split=config.split)
        params.update({k: getattr(config, k) for k in ("synthesis", "per_image", "posterior_temperature")},
                      neighbour_range=list(config.neighbour_range))
        return _Source(model, store, dev, params, None, src_anchors)
    params.update(synthesis="prior", per_image=1, anchors_hash=None, anchor_split=None, neighbour_range=None,
                  posterior_temperature=None)
    prior = prior_for(ckpt_path, model, store, config.prior_components, kind=config.prior, diffusion=config.diffusion)
    return _Source(model, store, dev, params, prior)


def _check_params(out: Path, params: dict) -> None:
    """A re-run into OUT must use the arguments the files there were made with."""
    path = out / "generation.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text(encoding="utf-8")).get("params", {})
    diff = [f"{k}: {old.get(k)!r} -> {params[k]!r}" for k in PARAM_KEYS if old.get(k) != params[k]]
    if diff:
        raise InputError(f"{out}: holds a generation made with other settings ({'; '.join(diff)}); "
                         "use another --out or delete it")


# --------------------------------------------------------------------------- decode
def _decode(src: _Source, config: GenerateConfig, start: int, stop: int):
    """Samples ``start..stop-1``: latents ``z (B, D)`` on the CPU, condition ids (or None), images
    ``x (B, C, H, W)`` in [0, 1] on the device and label maps ``(B, 1, H, W)`` uint8 (a joint model) or None."""
    if src.anchors is not None:
        z, ids = src.anchors.latents(start, stop, config.synthesis, config.seed, tuple(config.neighbour_range),
                                     config.posterior_temperature)
    else:
        ids = src.condition_ids(start, stop)
        z = latents(config.seed, start, stop, int(src.model.latent_dim), config.temperature, src.prior, ids)
    x = decode_latents(src.model, z.to(src.device), ids, src.amp_dtype)
    if src.condition[0] != "mask":
        return z, ids, x, None
    _, masks = split_joint(x.cpu().numpy(), src.condition[1])
    return z, ids, x[:, :-1], masks


def _batch_ranges(n: int, batch_size: int, wanted: int, missing: Callable[[], int]) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of the batches to decode: samples ``0..n-1``, then (for ``wanted`` patches
    of the augmented store: whole batches) on while ``missing()`` is positive, at most to
    ``n + 2 * wanted + batch_size`` (most samples flagged: stop and warn).
    """
    limit, start = n + 2 * wanted + batch_size, 0
    while start < n or (missing() > 0 and start < limit):
        stop = start + batch_size if wanted else min(start + batch_size, n)
        yield start, stop
        start = stop


# --------------------------------------------------------------------------- write
@dataclass
class _Dataset:
    """The written part of the generation: samples ``0..n-1``, their files and manifest rows."""

    out: Path
    store: PatchStore
    config: GenerateConfig
    checkpoint_sha256: str
    rows: list[dict] = field(default_factory=list)
    nn: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in audit.SPACES})
    counts: dict[str, int] = field(default_factory=lambda: {"written_files": 0, "skipped_existing": 0,
                                                           "flagged": 0, "dropped": 0})

    def write_batch(self, pool: ThreadPoolExecutor, start: int, z: torch.Tensor, x01: np.ndarray,
                    found: dict[str, np.ndarray], labels: dict[str, list[str]], masks: np.ndarray | None) -> None:
        """Files and rows of the batch's samples below ``n``.

        Args:
            start: index of the batch's first sample; z: ``(B, D)`` latents; x01: ``(B, C, H, W)``.
            found: ``audit.audit_batch`` of the batch (distances, patient, modality, flagged).
            labels: ``modality`` / ``class`` per sample (see :func:`_sample_labels`).
            masks: ``(B, 1, H, W)`` uint8 label maps of a joint model, or None.
        """
        cfg = self.config
        jobs = []
        for j in range(min(len(x01), cfg.n - start)):
            sid, mod, cls = f"{start + j:06d}", labels["modality"][j], labels["class"][j]
            flagged = bool(found["flagged"][j])
            drop = flagged and cfg.drop_flagged
            files = {"path": "", "mask": "", "preview": ""} if drop else \
                sample_files(sid, mod, cfg.format, cls, masks is not None)
            if not drop:
                jobs.append(pool.submit(write_sample, self.out, files, x01[j],
                                        None if masks is None else masks[j], self.store, mod))
            self.counts["flagged"] += flagged
            self.counts["dropped"] += drop
            for s in audit.SPACES:
                self.nn[s].append(float(found[s][j]))
            self.rows.append({"id": sid, "modality": mod, "class": cls, **files, "seed": cfg.seed,
                              "checkpoint_sha256": self.checkpoint_sha256,
                              "latent_norm": f"{float(z[j].norm()):.6g}",
                              "nearest_train_distance": f"{found['pixel'][j]:.6g}",
                              "nearest_train_distance_features": f"{found['feature'][j]:.6g}",
                              "nearest_train_patient": found["patient"][j], "flagged": int(flagged),
                              "source_row": labels["source_row"][j]})
        for job in jobs:
            written, skipped = job.result()
            self.counts["written_files"] += written
            self.counts["skipped_existing"] += skipped

    def write_manifest(self) -> None:
        with atomic_open(self.out / "manifest.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
            w.writeheader()
            w.writerows(self.rows)

    def per_modality(self) -> dict[str, int]:
        mods = [r["modality"] for r in self.rows]
        return {m: mods.count(m) for m in sorted(set(mods))}

    def per_class(self) -> dict[str, int]:
        classes = [r["class"] for r in self.rows if r["class"]]
        return {c: classes.count(c) for c in sorted(set(classes))}


def _sample_labels(src: _Source, ids: torch.Tensor | None, found: dict[str, np.ndarray], start: int
                   ) -> dict[str, list]:
    """Per sample: its ``modality`` (an anchor's, a modality model's condition, else the nearest training
    patch's), ``class`` (an anchor's, a class model's condition, else "") and ``source_row`` (an anchor's
    row in its store, else "")."""
    n = len(found["modality"])
    if src.anchors is not None:
        a = src.anchors
        rows = a.source_rows(start, start + n)
        classes = a.store.index["class"][rows].astype(str).tolist() if a.store.classes else [""] * n
        return {"class": classes, "modality": a.store.index["modality"][rows].astype(str).tolist(),
                "source_row": rows.tolist()}
    kind, names = src.condition
    named = [names[int(i)] for i in ids] if ids is not None else []
    return {"modality": named if kind == "modality" else [str(m) for m in found["modality"]],
            "class": named if kind == "class" else [""] * n, "source_row": [""] * n}


# --------------------------------------------------------------------------- augment
def _renormalize(x01: np.ndarray, modality: str, src: PatchStore, dst: PatchStore) -> np.ndarray:
    """Re-express [0, 1] values of ``src``'s normalization in ``dst``'s (same physical values)."""
    a, b = src.normalization(modality), dst.normalization(modality)
    if (a["low"], a["high"]) == (b["low"], b["high"]):
        return x01
    return np.clip((src.to_physical(x01, modality) - b["low"]) / (b["high"] - b["low"]), 0, 1)


@dataclass
class _Augmented:
    """Unflagged synthetic patches for ``--mix-with``: the first ``wanted``, in ``real``'s normalization."""

    real: PatchStore
    model_store: PatchStore
    seed: int
    wanted: int
    x: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)  # a joint model's label maps
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (modality, class, origin "seed<S>/<id>")

    @classmethod
    def open(cls, path, ratio: float, model_store: PatchStore, seed: int) -> _Augmented:
        real = open_store(path)
        if tuple(real.patches.shape[1:]) != tuple(model_store.patches.shape[1:]):
            raise InputError(f"{real.path}: patches {tuple(real.patches.shape[1:])} do not match the model's "
                             f"{tuple(model_store.patches.shape[1:])}; mix with a store of the same patch "
                             "size and channels")
        return cls(real, model_store, seed, int(round(ratio * real.select(split="train").size)))

    def missing(self) -> int:
        return self.wanted - len(self.rows)

    def add_batch(self, start: int, x01: np.ndarray, found: dict[str, np.ndarray], labels: dict[str, list[str]],
                  masks: np.ndarray | None) -> None:
        """Keep the batch's unflagged samples ``x01: (B, C, H, W)`` as float16 (with their ``modality`` and
        ``class`` from ``labels``, and their label maps) until ``wanted``."""
        for j in range(len(x01)):
            if self.missing() > 0 and not found["flagged"][j]:
                mod = labels["modality"][j]
                if masks is not None:
                    self.masks.append(masks[j])
                self.x.append(_renormalize(x01[j], mod, self.model_store, self.real).astype(np.float16))
                self.rows.append((mod, labels["class"][j], f"seed{self.seed}/{start + j:06d}"))

    def write(self, path: Path, params: dict, ratio: float) -> dict:
        """All patches of ``real`` + the synthetic ones (split ``train``), by ``write_derived_store``.

        In ``index.csv``, ``source`` is ``real`` or ``synthetic`` and a real row's own ``source`` moves
        to the extra column ``origin`` (a synthetic row's: ``seed<S>/<id>``); the real rows keep every
        other column (``class``, ``has_label``...), a class model's samples get the class they were
        generated for. Without a joint model's masks a store with labels is written without them.
        """
        real, n_syn = self.real, len(self.rows)
        if self.missing() > 0:
            log.warning("augmented store: only %d of %d synthetic patches passed the audit", n_syn, self.wanted)
        info = {"real_store": str(real.path.resolve()), "real_store_hash": real.content_hash,
                "checkpoint_sha256": params["checkpoint_sha256"], "seed": params["seed"],
                "temperature": params["temperature"], "ratio": ratio, "n_real": len(real), "n_synthetic": n_syn,
                "n_real_train": int(real.select(split="train").size)}
        syn = np.stack(self.x) if n_syn else np.zeros((0, *real.patches.shape[1:]), np.float16)
        mods, classes, origins = (list(c) for c in zip(*self.rows)) if n_syn else ([], [], [])
        added = {"modality": mods, "origin": origins, **({"class": classes} if any(classes) else {})}
        write_derived_store(path, real, columns={"source": "real", "origin": real.index["source"]}, added=syn,
                            added_columns=added, added_labels=np.stack(self.masks) if self.masks else None,
                            meta={"content_hash": sha256_json(info), "augmented": info})  # masks in step with rows
        log.info("augmented store %s: %d real + %d synthetic patches", path, len(real), n_syn)
        return {"path": "augmented_store", **info}


# --------------------------------------------------------------------------- generate
def generate(run, out, config: GenerateConfig, device: str = "auto", mix_with=None, ratio: float = 1.0,
             progress=None, anchors=None) -> dict:
    """Write ``config.n`` synthetic samples of a trained run in physical units, audited.

    Args:
        run: the run directory of ``medvae train`` (or a checkpoint file inside one).
        out: output directory (see the module docstring for its layout).
        config: GenerateConfig (n, seed, format, batch_size, temperature, checkpoint,
            audit_percentile, drop_flagged).
        device: ``auto|cpu|cuda``; decoding and the audit run there.
        mix_with: a real patch store: also write ``OUT/augmented_store`` with all its patches plus
            ``round(ratio * its train patches)`` unflagged synthetic ones (split ``train``); samples
            past ``n`` are decoded (not written as files) when the ``n`` generated are too few (prior samples).
        progress: optional callback ``progress(done, total)`` after each batch.
        anchors: a patch store whose ``config.split`` images anchored synthesis varies (``synthesis:
            neighbours | interpolate``): ``per_image`` variants of each, so ``n`` is their number.

    Returns:
        The ``generation.json`` summary dict.
    """
    t0, out = time.perf_counter(), Path(out)
    src = _open_source(Path(run), config, device, anchors)
    if src.anchors is not None:
        config = config.model_copy(update={"n": len(src.anchors)})
    _check_params(out, src.params)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "generation.json", {"status": "running", "params": src.params})
    mix = _Augmented.open(mix_with, ratio, src.store, config.seed) if mix_with is not None else None
    tm = {"load": time.perf_counter() - t0, "decode": 0.0, "audit": 0.0, "write": 0.0}
    with _timed(tm, "audit"):
        ref = audit.build_reference(src.store, src.device, percentile=config.audit_percentile)

    dataset = _Dataset(out, src.store, config, src.params["checkpoint_sha256"])
    # anchored samples stop at the last anchor's variants: the augmented store takes what passes among them
    wanted, missing = (mix.wanted, mix.missing) if mix is not None and src.anchors is None else (0, lambda: 0)
    with ThreadPoolExecutor(WRITE_THREADS) as pool, _deterministic_cudnn(), torch.inference_mode():
        for start, stop in _batch_ranges(config.n, config.batch_size, wanted, missing):
            with _timed(tm, "decode"):
                z, ids, x, masks = _decode(src, config, start, stop)
                x01 = x.cpu().numpy()
            with _timed(tm, "audit"):
                found = audit.audit_batch(ref, audit.features(x))
            with _timed(tm, "write"):
                labels = _sample_labels(src, ids, found, start)
                dataset.write_batch(pool, start, z, x01, found, labels, masks)
                if mix is not None:
                    mix.add_batch(start, x01, found, labels, masks)
            if progress is not None:
                progress(min(stop, config.n), config.n)

    with _timed(tm, "write"):
        dataset.write_manifest()
        sample_nn = {s: np.asarray(v) for s, v in dataset.nn.items()}
        audit.plot_audit(out / "audit.png", ref, sample_nn)
        augmented = mix.write(out / "augmented_store", src.params, ratio) if mix is not None else None
    tm["total"] = time.perf_counter() - t0
    audited = audit.summarize(ref, sample_nn, dataset.counts["flagged"], config.drop_flagged, "audit.png")
    log.info(audited["summary"])
    summary = {"status": "done", "params": src.params,
               "counts": {"samples": config.n, "per_modality": dataset.per_modality(),
                          "per_class": dataset.per_class(), **dataset.counts},
               "audit": audited, "augmented_store": augmented,
               "timings_s": {k: round(v, 4) for k, v in tm.items()},
               "samples_per_s": round(config.n / max(tm["total"], 1e-9), 2), "device": str(src.device),
               "precision": precision_name(src.amp_dtype)}
    write_json(out / "generation.json", summary)
    return summary
