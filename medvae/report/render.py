"""The one jinja2 environment of every report: the templates in ``medvae/report/templates`` (one base page
and one stylesheet that every page shares), autoescaped, numbers written by :mod:`medvae.report.text`."""

from __future__ import annotations

import functools

import jinja2

from medvae.report.text import fmt, num


@functools.cache
def environment() -> jinja2.Environment:
    """The environment (made once): package templates, autoescape on, an undefined name is an error."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("medvae.report", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(fmt=fmt, num=num)
    return env


def render(template: str, **context) -> str:
    """The page ``template`` (a file name in the templates folder) rendered with ``context``."""
    return environment().get_template(template).render(**context)


def macro(template: str, name: str):
    """The macro ``name`` of ``template``: called with its arguments, it returns safe HTML (``markupsafe.Markup``)."""
    return getattr(environment().get_template(template).module, name)
