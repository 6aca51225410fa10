"""The typer app, the one place where a user's mistake becomes one line and exit code 2, and the
one way command-line options are laid over a YAML config."""

from __future__ import annotations

import functools
import logging
from typing import Any, TypeVar, get_args

import typer
from pydantic import BaseModel

from medvae.config import load_config, load_yaml, parse_config
from medvae.errors import MedvaeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="medvae: scans -> patches -> VAE / VAE-GAN -> synthetic data and reports.")
log = logging.getLogger("medvae")
T = TypeVar("T", bound=BaseModel)


def user_errors(fn):
    """Turn a MedvaeError into one line on stderr and its exit code (2), without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MedvaeError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(err.exit_code) from None

    return wrapper


def config_with_options(path, model: type[T], options: dict[str, Any]) -> T:
    """``model`` from the YAML ``path`` (defaults when None) with the given command-line options on top.

    ``options`` maps dotted keys (``"train.max_steps"``) to values; ``None`` means "not given", so
    the YAML's value stays. The options are laid on the YAML's own keys, not on a dump of every
    default, so a config can still tell a key nobody gave (a denoise run without ``model.name``
    trains the objective's denoiser, :class:`medvae.config.TrainStageConfig`). A bad value raises
    ConfigError naming the option.
    """
    data = load_yaml(path) if path is not None else {}
    if path is not None:
        load_config(path, model)  # the YAML alone first: its own mistakes are named by its file
    for dotted, value in options.items():
        if value is None:
            continue
        *parents, key = dotted.split(".")
        section = data
        for p in parents:
            if not isinstance(section.get(p), dict):
                section[p] = {}
            section = section[p]
        section[key] = value
    return parse_config(data, model, "command line" if path is None else f"{path} + command line")


def choices(model: type[BaseModel], field: str) -> str:
    """``"a | b | c"``: the names the config field ``model.field`` accepts, read from its ``Literal`` type
    (the one list of them), for the help of the option that sets it."""

    def flat(tp) -> list:
        return [x for a in get_args(tp) if a is not type(None) for x in (flat(a) if get_args(a) else [a])]

    return " | ".join(map(str, flat(model.model_fields[field].annotation)))


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    """medvae: scans -> patches -> VAE / VAE-GAN -> synthetic data and reports."""
    from rich.logging import RichHandler

    # medvae's own logger, not the root's: records still propagate to whatever the host (pytest) set up.
    for handler in list(log.handlers):
        log.removeHandler(handler)
    log.addHandler(RichHandler(show_path=False, rich_tracebacks=False))
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
