"""`medvae run`: discover -> prepare -> train (each model) -> evaluate -> generate; and
:func:`train_stage`, the training stage `medvae train` shares.

Every stage is recorded in ``RUN/state.json`` with a key: the hash of its inputs and config.
Re-running skips stages whose key is unchanged, re-runs those whose inputs changed, and resumes
an interrupted training stage from its last checkpoint.

Layout of RUN (:class:`PipelineDir`): ``manifest.csv``, ``store/``, ``models/<name>/``, ``utility/`` (when
the pipeline has a ``utility`` section: the downstream study, run before the evaluation so its report
includes it), ``report/``, ``synthetic/``, ``state.json``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from medvae.config import (
    MODEL_KEYS,
    PACKAGED_PIPELINES,
    GenerateConfig,
    PipelineConfig,
    TrainStageConfig,
    load_yaml,
    packaged_pipelines,
    parse_config,
)
from medvae.data.discover import discover
from medvae.data.manifest import write_manifest
from medvae.data.prepare import prepare
from medvae.data.store import PatchStore, open_store
from medvae.denoising import selfsupervised
from medvae.downstream.study import run_utility
from medvae.downstream.studydir import StudyDir
from medvae.errors import ConfigError, InputError
from medvae.evaluation.evaluate import run_evaluation
from medvae.files import sha256_file, sha256_json, write_json
from medvae.io.phantoms import write_phantom_cohort
from medvae.report.reportdir import ReportDir
from medvae.synthesis.generate import generate
from medvae.training.rundir import RunDir
from medvae.training.tasks import ReconstructTask
from medvae.training.trainer import train

log = logging.getLogger(__name__)


class PipelineDir:
    """A pipeline's RUN directory: the one owner of its layout (each training run inside it is a
    :class:`~medvae.training.rundir.RunDir`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.state = self.path / "state.json"
        self.manifest = self.path / "manifest.csv"
        self.store = self.path / "store"
        self.utility = self.path / "utility"
        self.report = self.path / "report"
        self.synthetic = self.path / "synthetic"

    def model(self, name: str) -> Path:
        """The run directory of the pipeline's model ``name``."""
        return self.path / "models" / name


def pipeline_path(pipeline: str | os.PathLike) -> Path:
    """A pipeline YAML path as given, or the packaged pipeline of that name (``demo``, ``pancreas_ct``).

    Only a file counts as a path: ``medvae demo --out demo`` creates a folder ``demo`` in the
    working directory, and that folder must not hide the packaged ``demo`` pipeline.
    """
    path = Path(pipeline)
    if path.is_file():
        return path
    packaged = PACKAGED_PIPELINES / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and packaged.is_file():
        return packaged
    what = "is a directory, not a pipeline YAML" if path.is_dir() else "pipeline YAML not found"
    raise ConfigError(f"{pipeline}: {what}; give a path or a packaged pipeline ({', '.join(packaged_pipelines())})")


def expand_sweep(config: PipelineConfig, source: str = "pipeline") -> PipelineConfig:
    """The pipeline with every model replaced by one variant per combination of ``sweep`` values.

    A sweep key is ``model.<key>`` or ``train.<key>``; a variant is named after the model and the
    values that vary (``vae[latent_dim=32,upsample=nearest]``) and validated like any model config.
    """
    if not config.sweep:
        return config
    keys = list(config.sweep)
    for key in keys:
        section, _, name = key.partition(".")
        fields = {"model": MODEL_KEYS, "train": TrainStageConfig.model_fields["train"].annotation.model_fields
                  }.get(section, {})
        if name not in fields:
            raise ConfigError(f"{source}: unknown sweep key '{key}'; use model.<key> or train.<key> of a model config")
        if not isinstance(config.sweep[key], list) or not config.sweep[key]:
            raise ConfigError(f"{source}: sweep '{key}' needs a non-empty list of values")
    models = {}
    for base_name, base in config.models.items():
        for values in itertools.product(*(config.sweep[k] for k in keys)):
            data = base.model_dump(mode="json")
            for key, value in zip(keys, values):
                section, _, name = key.partition(".")
                data[section][name] = value
            label = ",".join(f"{k.partition('.')[2]}={'-'.join(map(str, v)) if isinstance(v, list) else v}"
                             for k, v in zip(keys, values))
            models[f"{base_name}[{label}]"] = parse_config(data, TrainStageConfig, f"{source}: sweep {label}")
    generate = config.generate
    if generate.model in config.models:  # generate from the first variant of the model it names
        generate = generate.model_copy(update={"model": next(n for n in models if n.startswith(generate.model + "["))})
    return config.model_copy(update={"models": models, "sweep": {}, "generate": generate})


def load_pipeline(path: str | os.PathLike) -> PipelineConfig:
    """Read and validate a pipeline YAML (unknown keys and bad values name key and file)."""
    config = parse_config(load_yaml(path), PipelineConfig, str(path))
    if config.generate.model and config.generate.model not in config.models:
        raise ConfigError(
            f"{path}: generate.model '{config.generate.model}' is not one of models: {', '.join(config.models)}"
        )
    config = expand_sweep(config, str(path))
    if not config.models:
        raise ConfigError(f"{path}: 'models' is empty; name at least one model to train")
    for name, cfg in config.models.items():  # refused now, not after discovery and preparation
        try:
            selfsupervised.check_config(cfg)
        except ConfigError as err:
            raise ConfigError(f"{path}: models.{name}: {err}") from None
    return config


def _beside(pipeline: str | os.PathLike, path: str) -> Path:
    """A path from a pipeline YAML: as given if it exists, else relative to the YAML's folder."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else Path(pipeline).resolve().parent / p


def _tree_fingerprint(root: Path) -> str:
    """Hash of every file's relative path, size and mtime under ``root`` (no pixel reads)."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            st = os.stat(os.path.join(dirpath, name))
            entries.append((os.path.relpath(os.path.join(dirpath, name), root), st.st_size, st.st_mtime_ns))
    return sha256_json(entries)


class StageRunner:
    """Runs stages once per key and records them in ``path`` (RUN/state.json, written atomically)."""

    def __init__(self, path: Path):
        self.path = path
        self.state: dict = {}
        self.timings: list[dict] = []  # this invocation's stages in order (see :meth:`run`)
        if self.path.exists():
            self.state = json.loads(self.path.read_text())

    def _save(self) -> None:
        write_json(self.path, self.state)

    def previous(self, name: str) -> dict:
        return self.state.get(name, {})

    def run(self, name: str, key: str, fn: Callable[[], None]) -> bool:
        """Run ``fn`` unless stage ``name`` already finished with ``key``; return True if it ran."""
        prev = self.previous(name)
        if prev.get("key") == key and prev.get("status") == "done":
            log.info("stage %s: up to date, skipped", name)
            self.timings.append({"stage": name, "seconds": prev.get("seconds"), "ran": False})
            return False
        log.info("stage %s: running", name)
        started = time.time()
        self.state[name] = {"key": key, "status": "running", "started": started}
        self._save()
        fn()
        self.state[name].update(status="done", seconds=round(time.time() - started, 2))
        self._save()
        self.timings.append({"stage": name, "seconds": self.state[name]["seconds"], "ran": True})
        return True

    def result(self, paths: dict) -> dict:
        """The state with the output ``paths`` (saved) and this invocation's ``timings`` (returned only)."""
        self.state["paths"] = paths
        self._save()
        return {**self.state, "timings": list(self.timings)}


# The widths ModelConfig.channels defaulted to before the patch-size defaults (config.DEFAULT_CHANNELS), which
# build the same networks at every size: a config without `channels` is keyed with them, so the training stages
# of a pipeline run before the change stay up to date. Change this when a default changes a network.
_KEYED_DEFAULT_CHANNELS = [32, 64, 128, 256]


def train_stage_key(store_hash: str, cfg: TrainStageConfig) -> str:
    """The up-to-date key of a training stage: the store and the stage's config as given."""
    data = cfg.stable_dump()
    if data["model"]["channels"] is None:
        data["model"]["channels"] = _KEYED_DEFAULT_CHANNELS
    return sha256_json([store_hash, data])


def train_stage(store: PatchStore | str | os.PathLike, out: str | os.PathLike, cfg: TrainStageConfig,
                device: str = "auto", resume: bool = False) -> dict:
    """Train ``cfg`` on ``store`` into the run directory ``out`` with the task ``cfg.task`` names: the VAE's
    reconstruction, or denoising with its objective (``supervised``: noisy input, clean target, the
    noise model; ``n2v`` / ``n2s`` / ``divnoising``: the store's noisy patches alone,
    :mod:`medvae.denoising.selfsupervised`). A config that cannot give a denoiser is refused here,
    before the first step (ConfigError)."""
    selfsupervised.check_config(cfg)
    store = store if isinstance(store, PatchStore) else open_store(store)
    if cfg.task == "denoise":
        cfg = selfsupervised.resolve_noise_model(store, cfg)
        task = selfsupervised.build_task(store, cfg)
    else:
        task = ReconstructTask(store, cfg.train.seed)
    return train(store, out, cfg, device=device, resume=resume, task=task)


def _train_stage(runner: StageRunner, name: str, key: str, store: Path, run_dir: Path, cfg, device: str) -> None:
    prev = runner.previous(f"train:{name}")
    interrupted = prev.get("key") == key and prev.get("status") == "running"
    resume = interrupted and RunDir(run_dir).checkpoint_path("last").exists()
    if not resume and run_dir.exists() and prev.get("key") != key:
        shutil.rmtree(run_dir)  # inputs changed: the old run belongs to other data or config
    if resume:
        log.info("stage train:%s: resuming the interrupted run from its last checkpoint", name)
    runner.run(f"train:{name}", key, lambda: train_stage(store, run_dir, cfg, device=device, resume=resume))


def quick_config(config: PipelineConfig) -> PipelineConfig:
    """The same pipeline with tiny counts: checks data and config in minutes before a long GPU run.

    Discovery and preparation are unchanged (so their outputs are reused by the full run).
    """
    config = config.model_copy(deep=True)
    for cfg in config.models.values():
        t = cfg.train
        t.max_steps, t.batch_size, t.val_batches, t.checkpoint_every = 2, min(t.batch_size, 8), 1, 2
        t.warmup_steps, t.disc_start = 1, 1
    config.evaluate.iwae_k, config.evaluate.mmd_samples, config.evaluate.mmd_permutations = 2, 32, 10
    config.evaluate.feature_steps = 20
    config.evaluate.denoise_patches = 4
    config.generate.n = 8
    for diffusion in (config.evaluate.diffusion, config.generate.diffusion):
        diffusion.steps, diffusion.sample_steps = 4, 2
    return config


def run_pipeline(pipeline: str | os.PathLike, scans: str | os.PathLike, out: str | os.PathLike,
                 quick: bool = False) -> dict:
    """Run every stage of ``pipeline`` on the scan directory ``scans`` into ``out``.

    ``quick`` runs the tiny version of the pipeline (:func:`quick_config`).

    Returns:
        The state dict (also in ``out/state.json``) with a ``paths`` entry naming the outputs, and
        ``timings``: one ``{"stage", "seconds", "ran"}`` per stage in the order they came, where
        ``ran`` is False for a stage skipped as up to date (its ``seconds`` are then those of the
        run that made it, None if unrecorded). ``timings`` is not written to state.json.
    """
    pipeline = pipeline_path(pipeline)
    config = load_pipeline(pipeline)
    if quick:
        config = quick_config(config)
    scans, run = Path(scans), PipelineDir(out)
    if not scans.is_dir():
        raise InputError(f"{scans}: scan directory not found; pass the folder that holds the scans to --scans")
    run.path.mkdir(parents=True, exist_ok=True)
    runner = StageRunner(run.state)
    labels = scans / config.labels if config.labels else None
    reference = _beside(pipeline, config.reference) if config.reference else None
    manifest, store_dir = run.manifest, run.store
    model_dirs = {name: run.model(name) for name in config.models}

    discover_key = sha256_json([config.discover.model_dump(mode="json"), config.labels, config.reference,
                                _tree_fingerprint(scans)])

    def do_discover() -> None:
        rows = discover(scans, labels=labels, modality=config.discover.modality, reference=reference,
                        config=config.discover)
        write_manifest(rows, manifest)

    runner.run("discover", discover_key, do_discover)

    prepare_key = sha256_json([sha256_file(manifest), config.prepare.model_dump(mode="json")])
    runner.run("prepare", prepare_key, lambda: prepare(manifest, store_dir, config.prepare))
    store_hash = open_store(store_dir).content_hash

    for name, cfg in config.models.items():
        key = train_stage_key(store_hash, cfg)
        _train_stage(runner, name, key, store_dir, model_dirs[name], cfg, config.device)

    def best(name: str) -> Path:
        return RunDir(model_dirs[name]).checkpoint("best")

    utility_dir = run.utility if config.utility is not None else None
    if config.utility is not None:
        utility = config.utility
        if utility.generator_run in model_dirs:  # one of this pipeline's models is the study's generator
            utility = utility.model_copy(update={"generator_run": str(model_dirs[utility.generator_run])})
        utility_key = sha256_json([store_hash, config.utility.stable_dump(),
                                   sha256_file(best(config.utility.generator_run))
                                   if config.utility.generator_run in model_dirs else None])
        runner.run("utility", utility_key, lambda: run_utility(store_dir, utility_dir, utility, device=config.device))

    report_dir = run.report
    names = list(config.models)
    evaluate_key = sha256_json([[sha256_file(best(n)) for n in names], config.evaluate.model_dump(mode="json"),
                                sha256_file(StudyDir(utility_dir).json) if utility_dir else None])
    runner.run("evaluate", evaluate_key, lambda: run_evaluation(
        model_dirs[names[0]], store_dir, report_dir, config.evaluate,
        compare=[model_dirs[n] for n in names[1:]], device=config.device,
        utility=StudyDir(utility_dir).summary() if utility_dir else None))

    if all(c.task == "denoise" for c in config.models.values()):  # denoisers have no prior to sample
        return runner.result({"manifest": str(manifest), "store": str(store_dir),
                              "models": {n: str(p) for n, p in model_dirs.items()},
                              "report": str(ReportDir(report_dir).html)})

    gen = config.generate
    gen_model = gen.model or names[-1]
    gen_cfg_dict = gen.model_dump(mode="json", exclude={"model", "mix_ratio"})
    gen_key = sha256_json([sha256_file(best(gen_model)), gen_cfg_dict, gen.mix_ratio])
    synthetic_dir = run.synthetic
    if runner.previous("generate").get("key") not in (None, gen_key) and synthetic_dir.exists():
        shutil.rmtree(synthetic_dir)  # another checkpoint or settings: generate refuses to mix old files in
    runner.run("generate", gen_key, lambda: generate(
        model_dirs[gen_model], synthetic_dir, GenerateConfig(**gen_cfg_dict), device=config.device,
        mix_with=store_dir if gen.mix_ratio else None, ratio=gen.mix_ratio or 1.0))

    return runner.result({
        "manifest": str(manifest), "store": str(store_dir), "models": {n: str(p) for n, p in model_dirs.items()},
        "report": str(ReportDir(report_dir).html), "synthetic": str(synthetic_dir),
        **({"utility": str(StudyDir(utility_dir).report)} if utility_dir else {}),
    })


def demo(out: str | os.PathLike = "demo_out", pipeline: str | os.PathLike = "demo", quick: bool = False) -> dict:
    """Write the phantom cohort (CT + microscopy) into ``out/scans`` and run demo.yaml on it.

    Returns:
        :func:`run_pipeline`'s state, its ``timings`` led by the phantom stage (``ran`` False when
        the cohort was already written).
    """
    out = Path(out)
    scans, done = out / "scans", out / "scans" / ".phantom-complete"
    if done.exists():
        phantom = {"stage": "phantom", "seconds": json.loads(done.read_text()).get("seconds"), "ran": False}
    else:  # the marker makes an interrupted phantom write start over
        started = time.time()
        shutil.rmtree(scans, ignore_errors=True)
        # 256² CT instead of 512²: the patches are 128² anyway, and more patients generalize better
        summary = write_phantom_cohort(scans, ct_patients=16, microscopy_stacks=4, seed=0, ct_size=256)
        phantom = {"stage": "phantom", "seconds": round(time.time() - started, 2), "ran": True}
        write_json(done, {**summary, "seconds": phantom["seconds"]})
    state = run_pipeline(pipeline, scans, out / "run", quick=quick)
    return {**state, "timings": [phantom, *state["timings"]]}
