"""What a model version's requirements may ask for: named packages from the configured index, nothing else.

A model's requirements are written by its author, who is not a retrotest administrator (docs/security.md). A
URL, VCS or path requirement, or an option line (`--extra-index-url`, `-e`, `-f`), would make uv fetch code
from wherever the author likes and build it, running its `setup.py` on the worker. So every entry of every file
(python_env.yaml's dependencies, the requirements and constraints files they name, conda.yaml's pip section)
must be one PEP 508 requirement by name: a name, extras, version specifiers and markers. A control character or a
line break anywhere refuses the entry: uv reads the lines joined, so a newline inside one entry would be an
option of its own.
"""

from __future__ import annotations

import re
import unicodedata
from typing import NoReturn

from packaging.requirements import InvalidRequirement, Requirement

from app.errors import EnvironmentFailed

SHOWN_CHARS = 120  # an entry is shown in the job error, escaped, at most this long
# uv and pip read a "name" with an archive's suffix as a file to install (pkg-1.0.tar.gz, x.whl).
_ARCHIVE = re.compile(r"\.(whl|zip|tar|tgz|tbz|txz|tar\.gz|tar\.bz2|tar\.xz|egg)$", re.IGNORECASE)
_PYTHON_VERSION = re.compile(r"^\d+\.\d+(\.\d+)?[A-Za-z0-9.*+]{0,16}$")


def shown(entry: str) -> str:
    """The entry as the job error shows it: quoted, control characters escaped, bounded."""
    text = repr(entry)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 4] + " ..."


def has_control_character(text: str) -> bool:
    """Whether the text holds a control character or a line break of any kind (including U+2028)."""
    return any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in text)


def check_requirement(entry: str) -> str:
    """The entry when it names a package by PEP 508 name; EnvironmentFailed naming it and why otherwise."""
    if has_control_character(entry):
        _refuse(entry, "it holds a control character or a line break")
    if entry.startswith("-"):
        _refuse(entry, "it is an option (retrotest installs from its configured index only)")
    if "\\" in entry:
        _refuse(entry, "it holds a backslash (a line continuation)")
    try:
        requirement = Requirement(entry)
    except InvalidRequirement:
        _refuse(entry, "it is not a package name with optional extras, versions and markers (PEP 508)")
    if requirement.url or _ARCHIVE.search(requirement.name):
        _refuse(entry, "it names a URL, a VCS link or a file; only packages from the configured index are installed")
    return entry


def check_python_version(version: str, *, what: str) -> str:
    """The Python version a model was logged with, when it looks like one."""
    if not _PYTHON_VERSION.fullmatch(version):
        raise EnvironmentFailed(f"{what} names the Python version {shown(version)}, which is not a version")
    return version


def _refuse(entry: str, why: str) -> NoReturn:
    raise EnvironmentFailed(
        f"the model's requirement {shown(entry)} is refused: {why}; a model may ask only for named packages "
        "(name, extras, version specifiers, markers) from the index retrotest is configured with"
    )
