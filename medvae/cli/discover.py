"""`medvae discover`: find the scans, write manifest.csv, print what was found."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medvae.cli.app import app, choices, config_with_options, user_errors
from medvae.config import DiscoverConfig
from medvae.errors import InputError

if TYPE_CHECKING:
    from medvae.data.discover import Discovery


@app.command()
@user_errors
def discover(
    scans_dir: Path = typer.Argument(..., help="Scan directory (TCIA, MSD, NIfTI or TIFF folder)."),
    out: Path = typer.Option(..., "--out", help="Manifest CSV to write."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Directory of label maps."),
    modality: Optional[str] = typer.Option(
        None, help=f"{choices(DiscoverConfig, 'modality')} (default: the config's, else auto)"),
    reference: Optional[Path] = typer.Option(None, help="Reference manifest to reconcile with."),
    seed: Optional[int] = typer.Option(None, help="Seed of the patient-level split (default 0)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML with DiscoverConfig keys."),
) -> None:
    """Find scans, validate them, assign patient-level splits, write manifest.csv."""
    from medvae.data.discover import run_discovery
    from medvae.data.manifest import write_manifest

    cfg = config_with_options(config, DiscoverConfig, {"modality": modality, "split.seed": seed})
    found = run_discovery(scans_dir, labels, cfg.modality, reference, cfg)
    if not found.rows:
        raise InputError(f"no scans found in {scans_dir} (looked for TCIA/DICOM, MSD, NIfTI and TIFF layouts)")
    write_manifest(found.rows, out)
    print_summary(found, Path(scans_dir), out)
    if not any(r.ok for r in found.rows):
        raise InputError(f"no usable scan in {scans_dir}; every row of {out} is a problem")


def print_summary(found: Discovery, root: Path, out: Path) -> None:
    """The per-modality split table, problems and warnings, and the reference reconciliation."""
    console = Console(highlight=False, soft_wrap=True)  # long lines stay whole (logs, grep)
    ok = [r for r in found.rows if r.ok]
    table = Table(title=f"Discovered under {root}")
    table.add_column("modality")
    for split in ("train", "val", "test"):
        table.add_column(f"{split} patients", justify="right")
    table.add_column("scans", justify="right")
    table.add_column("problem rows", justify="right")
    bad = Counter(r.modality or "?" for r in found.rows if not r.ok)
    for mod in sorted({r.modality or "?" for r in found.rows}):
        pats = {
            s: len({r.patient_id for r in ok if r.modality == mod and r.split == s})
            for s in ("train", "val", "test")
        }
        table.add_row(
            mod,
            *(str(pats[s]) for s in ("train", "val", "test")),
            str(sum(r.modality == mod for r in ok)),
            str(bad.get(mod, 0)),
        )
    console.print(table)
    missing = set(found.missing)  # summarised with the reference below
    for kind, rows in (
        ("[red]problem[/red]", [r for r in found.rows if not r.ok and r.patient_id not in missing]),
        ("[yellow]warning[/yellow]", [r for r in ok if r.problem]),
    ):
        for r in rows[:20]:
            console.print(f"{kind} {escape(r.patient_id)}: {escape(r.problem)}")
        if len(rows) > 20:
            console.print(f"... and {len(rows) - 20} more: see the problem column of {escape(str(out))}")
    if found.ignored:
        names = escape(", ".join(str(p.relative_to(root)) for p in found.ignored[:8]))
        console.print(
            f"ignored {len(found.ignored)} file(s) of unknown type: {names}"
            + (" ..." if len(found.ignored) > 8 else "")
        )
    if found.unused_labels:
        console.print(
            f"{len(found.unused_labels)} label file(s) matched no scan: "
            + escape(", ".join(p.name for p in found.unused_labels[:8]))
        )
    if found.reference is not None:

        def some(ids: list[str]) -> str:
            return ", ".join(ids[:10]) + (" ..." if len(ids) > 10 else "")

        n_bad = len({r.patient_id for r in found.rows if not r.ok and r.patient_id not in missing})
        console.print(
            f"reference {escape(str(found.reference))}: "
            f"{len(found.missing)} missing ({some(found.missing)}), "
            f"{len(found.extra)} extra ({some(found.extra)}), "
            f"{n_bad} found but unusable; splits taken from the reference"
        )
    console.print(
        f"{len(ok)} usable scan(s) of {len({r.patient_id for r in ok})} patient(s); manifest: {out}"
    )
