"""`medvae prepare`: manifest -> patch store (or join shard stores), then a summary table."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.table import Table

from medvae.cli.app import app, choices, config_with_options, user_errors
from medvae.config import PrepareConfig
from medvae.errors import ConfigError

if TYPE_CHECKING:
    from medvae.data.store import PatchStore


@app.command()
@user_errors
def prepare(
    manifest: Optional[Path] = typer.Argument(None, help="manifest.csv from `medvae discover`."),
    out: Path = typer.Option(..., "--out", help="Patch store directory to write."),
    patch_size: Optional[int] = typer.Option(None, help=f"{choices(PrepareConfig, 'patch_size')}."),
    mode: Optional[str] = typer.Option(
        None, help=f"{choices(PrepareConfig, 'mode')} (resize: whole slice or image; tile: native resolution; "
                   "pad: 2D image sets)."),
    stride: Optional[int] = typer.Option(None, help="Tile stride in pixels (tile mode)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML with PrepareConfig keys."),
    workers: Optional[int] = typer.Option(None, help="Volumes processed in parallel (default: one per CPU core)."),
    shard: Optional[str] = typer.Option(None, help="i/N: prepare only shard i of N volumes."),
    merge: Optional[list[Path]] = typer.Option(None, "--merge", help="Shard stores to join into --out."),
) -> None:
    """Slice, normalize and patch the manifest's volumes into a memory-mapped patch store."""
    from medvae.data.prepare import merge_stores
    from medvae.data.prepare import prepare as prepare_store

    if merge:
        store = merge_stores(list(merge), out)
    elif manifest is None:
        raise ConfigError("medvae prepare: give manifest.csv (or --merge STORE ... to join shards)")
    else:
        cfg = config_with_options(config, PrepareConfig, {"patch_size": patch_size, "mode": mode,
                                                          "stride": stride, "workers": workers})
        store = prepare_store(manifest, out, cfg, shard=shard)
    print_summary(store)


def print_summary(store: PatchStore) -> None:
    """Patients and patches per modality and split, then the problems met on the way."""
    table = Table(title=f"patch store {store.path} ({len(store)} patches, {store.meta['dtype']})")
    for col in ("modality", "split", "patients", "patches"):
        table.add_column(col)
    for m in store.modalities:
        for s in store.splits:
            rows = store.select(s, m)
            if len(rows):
                table.add_row(m, s, str(len(set(store.index["patient_id"][rows]))), str(len(rows)))
    console = Console(highlight=False, soft_wrap=True)
    console.print(table)
    classes = store.meta.get("classes") or []
    if classes and "class" in store.index:
        by_class = Table(title="patches per class and split")
        by_class.add_column("class")
        splits = store.splits
        for s in splits:
            by_class.add_column(s, justify="right")
        counts = store.class_counts()
        for c in classes:
            by_class.add_row(c, *(str(counts.get((s, c), 0)) for s in splits))
        console.print(by_class)
    from medvae.data.store import STORE_JSON  # loaded with the store already

    problems = store.meta.get("problems", [])
    for p in problems[:10]:
        console.print(f"[yellow]problem:[/] {p}")
    if len(problems) > 10:
        console.print(f"[yellow]... and {len(problems) - 10} more problems, listed in {store.path / STORE_JSON}[/]")
