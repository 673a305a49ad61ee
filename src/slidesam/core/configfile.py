"""YAML run configs made of typed dataclass sections: one reader for every trainer.

A run config (``slidesam train``, ``slidesam unet-train``, ``slidesam msam train``, ...) is a
frozen dataclass whose fields are *sections*, each itself a frozen dataclass of settings. Mix
:class:`SectionedConfig` into it to get, with the same messages everywhere:

- ``from_dict(data)``: unknown sections and keys are an ``InputError`` that names them and the
  valid ones (all unknown keys are reported before any value is checked); a missing required
  section (``REQUIRED``) is named; with ``COERCE`` the values are checked against the fields'
  annotations (``_coerce``: numbers, strings, booleans, tuples, unions with null) and the error
  names the key and the expected type, otherwise the section's own ``__post_init__`` checks
  them;
- ``to_dict()`` / ``save(path)`` (``yaml.safe_dump``, readable back by ``from_dict``);
- ``load(path)``: ``yaml.safe_load`` with errors that name the file.

Torch-free, like the rest of ``slidesam.core``.
"""

from __future__ import annotations

import types
import typing
from dataclasses import asdict, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

import yaml

from slidesam.core.errors import InputError

__all__ = ["SectionedConfig", "from_mapping", "plain", "read_yaml", "with_options"]


class SectionedConfig:
    """Mixin for a frozen dataclass of sections (see the module docstring).

    Class attributes:
        KIND: what the config configures, for messages (``"a training config"``).
        REQUIRED: sections that must be present.
        COERCE: check values against the annotations (True) or leave it to the sections.
    """

    KIND: ClassVar[str] = "a config"
    REQUIRED: ClassVar[tuple[str, ...]] = ("data",)
    COERCE: ClassVar[bool] = True

    @classmethod
    def from_dict(cls, data: Any):
        """Build from plain data (a parsed YAML file), naming unknown sections and keys."""
        if not isinstance(data, dict):
            raise InputError(f"{cls.KIND} must be a mapping of sections, got {_kind(data)}")
        hints = get_type_hints(cls)
        sections = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in data if k not in sections)
        if unknown:
            raise InputError(
                f"unknown config section(s): {', '.join(unknown)}; valid: {', '.join(sections)}"
            )
        for name in cls.REQUIRED:
            if name not in data:
                raise InputError(f"the config has no '{name}' section")
        data = {name: {} if value is None else value for name, value in data.items()}
        for name, value in data.items():
            if not isinstance(value, dict):
                raise InputError(f"section '{name}' must be a mapping of keys, got {_kind(value)}")
        problems = [
            p
            for name, value in data.items()
            if (p := _unknown(hints[name], value, f"section '{name}'"))
        ]
        if problems:
            raise InputError("; ".join(problems))
        return cls(
            **{name: _section(hints[name], value, name, cls.COERCE) for name, value in data.items()}
        )

    def to_dict(self) -> dict:
        """Plain YAML/JSON-ready data; ``from_dict`` reads it back."""
        return plain(asdict(self))

    def with_out_dir(self, out_dir: str | Path):
        """The same config writing to ``out_dir`` (its ``run`` section's ``out_dir``)."""
        return replace(self, run=replace(self.run, out_dir=str(out_dir)))

    def save(self, path: str | Path) -> Path:
        """Write as YAML (``yaml.safe_dump``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    @classmethod
    def load(cls, path: str | Path):
        """Read a YAML config file; errors name the file and the key."""
        data = read_yaml(path)
        try:
            return cls.from_dict(data)
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from None


def read_yaml(path: str | Path) -> Any:
    """``yaml.safe_load`` of a file, with one-line errors that name it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such config file")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0]
        raise InputError(f"{path}: not valid YAML ({first})") from None


def from_mapping(cls: type, data: Any, what: str):
    """``cls(**data)`` for a flat dataclass: anything but a mapping, or keys ``cls`` lacks, are an
    ``InputError`` naming them and the valid ones; lists become tuples; the dataclass's own
    ``__post_init__`` checks the values."""
    if not isinstance(data, dict):
        raise InputError(f"{what} must be a mapping of keys, got {_kind(data)}")
    known = [f.name for f in fields(cls)]
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise InputError(
            f"unknown key(s) in {what}: {', '.join(unknown)} (valid: {', '.join(known)})"
        )
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise InputError(f"{what}: {exc}") from None


def with_options(config, what: str = "option", **options):
    """``dataclasses.replace(config, **options)``; names it lacks are an ``InputError`` that
    lists the valid ones."""
    known = sorted(f.name for f in fields(config))
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise InputError(f"unknown {what}(s) {', '.join(unknown)}; valid: {', '.join(known)}")
    return replace(config, **options)


def plain(value: Any) -> Any:
    """Tuples to lists, recursively (what ``yaml.safe_dump`` and JSON write)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------
# checking plain data against the dataclasses' annotations
# ----------------------------------------------------------------------------------------------
def _unknown(cls: type, value: dict, where: str) -> str | None:
    """The message naming the keys of ``value`` that ``cls`` lacks, or None."""
    known = [f.name for f in fields(cls)]
    unknown = sorted(str(k) for k in value if k not in known)
    if not unknown:
        return None
    return f"unknown key(s) in {where}: {', '.join(unknown)} (valid: {', '.join(known)})"


def _section(cls: type, value: dict, name: str, coerce: bool):
    if coerce:
        hints = get_type_hints(cls)
        value = {k: _coerce(v, hints[k], f"{name}.{k}") for k, v in value.items()}
    try:
        return cls(**value)
    except InputError as exc:
        message = str(exc)
        raise InputError(
            message if message.startswith(f"{name}.") else f"{name}: {message}"
        ) from None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except InputError:
                continue
        raise InputError(f"{where} must be {_describe(hint)}, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, str):
            value = [value]  # a single folder or class name
        if isinstance(value, list | tuple):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
            if len(value) == len(args):
                pairs = enumerate(zip(value, args, strict=True))
                return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in pairs)
    elif hint is dict or origin is dict:
        if isinstance(value, dict):
            return value
    elif is_dataclass(hint) or hint is typing.Any:
        return value
    raise InputError(f"{where} must be {_describe(hint)}, got {value!r}")


def _describe(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)} {_describe(args[0])}"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    if hint is dict or origin is dict:
        return "a mapping"
    return names.get(hint, str(hint))


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__
