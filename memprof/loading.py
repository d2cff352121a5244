"""Loading memprof's files by what they are: a profile (JSON, ``memprof.profile/1``) or a plan (TOML,
``memprof.plan/1``), every field checked, every problem a :class:`~memprof.errors.ProfileFormatError` naming the
file and the field. Nothing in a file is imported or executed. Torch-free.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ProfileFormatError
from .files import read_json
from .plans import load_plan
from .profile_schema import SchemaError, check_profile
from .profiles import SCHEMA, Profile

__all__ = ["load", "load_profile", "load_plan"]


def load_profile(path: str | os.PathLike):
    """Read a profile JSON file written by ``Profile.save``; every field's type and range is checked."""
    data = read_json(path)
    schema = data.get("schema")
    if schema != SCHEMA:
        if schema is None:
            raise ProfileFormatError(path, f"not a memprof profile (no 'schema' field; expected {SCHEMA!r})")
        raise ProfileFormatError(path, f"schema {str(schema)[:80]!r} is not supported (expected {SCHEMA!r})")
    try:
        check_profile(data)
        return Profile.from_dict(data)
    except SchemaError as e:
        raise ProfileFormatError(path, f"malformed profile field {e.field}: {e.problem}") from None
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError) as e:
        what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise ProfileFormatError(path, f"malformed profile: {what}") from None


def load(path: str | os.PathLike):
    """Load a memprof file: a profile (``.json``) or a plan (``.toml``), chosen by content."""
    p = Path(path)
    if p.suffix.lower() == ".toml":
        return load_plan(p)
    return load_profile(p)
