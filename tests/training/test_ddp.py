"""Data-parallel training on CPU with the gloo backend: two processes end with the same weights
(unconditional and class-conditional VAE–GAN)."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from medvae.config import TrainStageConfig
from medvae.data.store import open_store
from medvae.models import build_model
from medvae.training.distributed import DistInfo, init_distributed, shutdown
from medvae.training.families import build_step
from medvae.training.tasks import ReconstructTask
from medvae.training.trainer import _Trainer, resolve_config
from tests.factories import blobs, disc_store, tiny_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, store_path: str, out: str, cfg: dict, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    store = open_store(store_path)
    info = init_distributed("cpu")
    try:
        cfg = resolve_config(TrainStageConfig.model_validate(cfg), store)
        trainer = _Trainer(store, Path(out), cfg, torch.device("cpu"), info, ReconstructTask(store, cfg.train.seed),
                           resume=False)
        ids, train_step = [], trainer._train_step

        def recording(batch):  # the condition ids each training step of this rank was given
            ids.append(None if batch.ids is None else (tuple(batch.ids.shape), batch.ids.dtype, batch.ids.tolist(),
                                                       batch.rows.tolist()))
            return train_step(batch)

        trainer._train_step = recording
        summary = trainer.run()
        result = {"state": trainer.model.state_dict(), "summary": summary,
                  "rows": trainer.batches.epoch_rows(0), "ids": ids}
        torch.save(result, Path(result_dir) / f"rank{rank}.pt")
    finally:
        shutdown(info)


def test_two_cpu_processes_keep_identical_weights(tiny_store, tmp_path):
    cfg = tiny_config("vaegan", max_steps=4, disc_start=1, checkpoint_every=2, batch_size=4)
    mp.spawn(_worker, args=(2, _free_port(), str(tiny_store.path), str(tmp_path / "run"),
                            cfg.model_dump(mode="json"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert set(r0["rows"]).isdisjoint(r1["rows"])  # each rank reads its own shard of the epoch
    for name, p0 in r0["state"].items():
        assert torch.equal(p0, r1["state"][name]), name
    assert r0["summary"]["step"] == r1["summary"]["step"] == 4
    # rank 0 alone wrote the run, and it logged the global batch's throughput
    run = tmp_path / "run"
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    for name, p0 in r0["state"].items():
        assert torch.equal(ckpt["model_state"][name], p0), name


def test_two_cpu_processes_train_a_class_conditional_vaegan_identically(tmp_path):
    """condition: class under DDP: the class embedding and the projection critic stay identical on
    both ranks, and each rank conditions every step on one id per image of its own shard."""
    n = 32
    store = disc_store(tmp_path / "store", {"train": n}, seed=3, patient_id=[f"P{i // 4}" for i in range(n)],
                       classes=["disc", "ring"] * (n // 2), content_hash="ddp-classes")
    cfg = tiny_config("vaegan", max_steps=3, disc_start=1, checkpoint_every=3, batch_size=4)
    cfg.model.condition = "class"
    mp.spawn(_worker, args=(2, _free_port(), str(store.path), str(tmp_path / "run"), cfg.model_dump(mode="json"),
                            str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    conditional = [k for k in r0["state"] if "condition_embedding" in k or "projection" in k]
    assert any("condition_embedding" in k for k in conditional) and any("projection" in k for k in conditional)
    for name, p0 in r0["state"].items():
        assert torch.equal(p0, r1["state"][name]), name
    assert r0["summary"]["step"] == r1["summary"]["step"] == 3
    assert len(r0["ids"]) == len(r1["ids"]) == 3
    classes = store.class_ids()
    for (shape0, dtype0, ids0, rows0), (shape1, dtype1, ids1, rows1) in zip(r0["ids"], r1["ids"]):
        assert shape0 == shape1 == (4,) and dtype0 == dtype1 == torch.int64  # batch_size per rank
        assert set(rows0).isdisjoint(rows1)  # each rank its own shard
        assert ids0 == classes[rows0].tolist() and ids1 == classes[rows1].tolist()  # the rows' own classes


def _rank_gradients(cfg: dict, info: DistInfo, rank: int) -> dict:
    """Gradients of one VAE–GAN training step (generator and critic, R1 on) on rank ``rank``'s batch,
    with rank ``rank``'s noise; averaged over ranks when ``info`` is a real process group."""
    stage = TrainStageConfig.model_validate(cfg)
    stage.model.image_size = 64
    torch.manual_seed(0)
    model = build_model(stage.model)
    steps = build_step(model, stage.train, torch.device("cpu"), info, None, total_steps=10)
    torch.manual_seed(100 + rank)
    x = blobs(4, seed=rank)
    terms, _ = steps.backward(x, step=stage.train.disc_start, beta=0.5, target=x, weight=None)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _grad_worker(rank: int, world: int, port: int, cfg: dict, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    try:
        torch.save(_rank_gradients(cfg, info, rank), Path(result_dir) / f"grads{rank}.pt")
    finally:
        shutdown(info)


def test_ddp_gradients_are_the_mean_of_the_single_process_gradients(tmp_path):
    """DDP over the generator and the critic (adaptive GAN weight and R1 included) gives every rank
    the mean of the gradients that one process computes for the two ranks' batches in turn."""
    cfg = tiny_config("vaegan", disc_start=0, grad_clip=0.0, r1_gamma=1.0, free_bits=0.01).model_dump(mode="json")
    mp.spawn(_grad_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    g0 = torch.load(tmp_path / "grads0.pt", weights_only=True)
    g1 = torch.load(tmp_path / "grads1.pt", weights_only=True)
    single = [_rank_gradients(cfg, DistInfo(), r) for r in (0, 1)]
    assert set(g0) == {n for n, _ in build_model(TrainStageConfig.model_validate(cfg).model.model_copy(
        update={"image_size": 64})).named_parameters()}
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name
        mean = (single[0][name] + single[1][name]) / 2
        assert not torch.equal(single[0][name], single[1][name]), name  # the ranks' batches differ
        torch.testing.assert_close(g0[name], mean, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.skipif(not (shutil.which("torchrun") or Path(sys.executable).with_name("torchrun").exists()),
                    reason="torchrun not installed")
def test_torchrun_cli_on_cpu(tiny_store, tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config("vae", max_steps=4, batch_size=4).model_dump(mode="json")))
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun if torchrun.exists() else "torchrun"), "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "medvae", "train", str(tiny_store.path), "--model", "vae", "--out",
           str(tmp_path / "run"), "--config", str(cfg_path), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_json = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_json["status"] == "done" and run_json["step"] == 4 and run_json["world_size"] == 2
    assert len((tmp_path / "run" / "train_log.jsonl").read_text().splitlines()) == 4
