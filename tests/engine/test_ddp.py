"""Data-parallel training on CPU with the gloo backend: two processes end with the same weights."""

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
from medvae.engine.distributed import init_distributed, shutdown
from medvae.engine.trainer import _Trainer, resolve_config
from tests.engine.conftest import tiny_config


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
        trainer = _Trainer(store, Path(out), resolve_config(TrainStageConfig.model_validate(cfg), store),
                           torch.device("cpu"), info, resume=False)
        summary = trainer.run()
        result = {"state": trainer.model.state_dict(), "summary": summary,
                  "rows": trainer.batches.epoch_rows(0)}
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
