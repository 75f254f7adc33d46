"""YAML configs with ``key=value`` overrides, checked against frozen dataclasses.

A config is a YAML mapping. It is turned into a frozen dataclass by
:func:`build`, which rejects unknown keys (naming them and the valid ones) and
recurses into dataclass-typed fields. Overrides are ``dotted.key=value``
strings whose value is parsed as a YAML scalar (``1e-4`` -> float, ``true`` ->
bool, ``null`` -> None, ``[1, 2]`` -> list).

A string field whose dataclass type is itself a dataclass may name a config
file instead of spelling it out inline: ``method: ngdiff`` is looked up as
``configs/methods/ngdiff.yaml`` (the directory is given by the field's
``metadata={"config_dir": "methods"}``), and a value ending in ``.yaml`` is a
path. Overrides can reach inside such a reference (``method.forget.beta=0.2``).

Typical use::

    cfg = load_config(UnlearnConfig, "configs/experiments/tofu_ngdiff.yaml",
                      ["method=ngdiff", "steps=50", "optim.lr=1e-4"])
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ngdiff_jax.paths import CONFIG_DIR

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "apply_overrides",
    "build",
    "load_config",
    "load_yaml",
    "parse_override",
    "resolve_config_path",
    "to_dict",
]


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's floats: ``1e-4`` (no dot) is a number, not the string YAML 1.1 makes it,
    in files, overrides and inside lists (``population.lr=[1e-4, 1e-3]``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+][0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _yaml(text):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping (an empty file gives ``{}``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist; pass an existing YAML file.")
    with open(path) as f:
        try:
            data = _yaml(f)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError(f"config file {where} is not valid YAML ({' '.join(str(problem).split())}); "
                              "fix the syntax there (indentation, a missing ':' or quote).") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a YAML mapping, got {type(data).__name__}.")
    return data


def resolve_config_path(name: str | Path, subdir: str | None = None) -> Path:
    """Find a config by name (``ngdiff`` -> ``configs/<subdir>/ngdiff.yaml``) or by path."""
    p = Path(name)
    tried = []
    if p.suffix in (".yaml", ".yml"):
        candidates = [p, CONFIG_DIR / p]
        if subdir:
            candidates.append(CONFIG_DIR / subdir / p.name)
    else:
        candidates = [CONFIG_DIR / subdir / f"{name}.yaml"] if subdir else []
        candidates.append(CONFIG_DIR / f"{name}.yaml")
    for c in candidates:
        tried.append(str(c))
        if c.is_file():
            return c
    available = ""
    if subdir and (CONFIG_DIR / subdir).is_dir():
        names = sorted(q.stem for q in (CONFIG_DIR / subdir).glob("*.yaml"))
        available = f" Available in configs/{subdir}: {', '.join(names)}."
    raise FileNotFoundError(f"config {name!r} not found (looked for {', '.join(tried)}).{available}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-4"`` -> ``(["optim", "lr"], 0.0001)`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. optim.lr=1e-4).")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key; write dotted.key=value.")
    try:
        value = _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value {raw!r} is not valid YAML ({e}).") from e
    if isinstance(value, str) and _looks_like_float(value):  # YAML 1.1 reads "1e-4" as a string
        value = float(value)
    return key.split("."), value


def _looks_like_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return any(c in s.lower() for c in "e.") and s.strip().lower() not in ("nan", "inf", "-inf")


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``dotted.key=value`` set (creating sub-mappings)."""
    out = _deepcopy(data)
    made: set[int] = set()  # mappings made by these overrides (an earlier override reached into them)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for i, k in enumerate(keys[:-1]):
            child = node.get(k)
            if child is None or isinstance(child, str):
                # A string here is a reference to a config file; the override extends it.
                child = {"_base": child} if isinstance(child, str) else {}
                node[k] = child
                made.add(id(child))
            elif not isinstance(child, dict):
                raise ConfigError(
                    f"override {text!r}: {'.'.join(keys[: i + 1])} is a {type(child).__name__}, "
                    "not a mapping, so it has no sub-keys."
                )
            node = child
        last = keys[-1]
        if isinstance(node.get(last), dict) and isinstance(value, str) and id(node[last]) in made:
            node[last]["_base"] = value  # `a.b=1 a=name`: the name, extended by the earlier overrides
        elif isinstance(node.get(last), dict) and isinstance(value, str) and "_base" not in node[last]:
            node[last] = value  # replacing an inline section by a named config
        elif isinstance(node.get(last), dict) and "_base" in node[last] and not isinstance(value, dict):
            node[last]["_base"] = value
        else:
            node[last] = value
    return out


def _deepcopy(x):
    if isinstance(x, Mapping):
        return {k: _deepcopy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deepcopy(v) for v in x]
    return x


def deep_merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``, mapping by mapping. A mapping over a string keeps the string as its
    ``_base`` (a named config, or a registered choice's type: ``combiner: gdiff`` under
    ``combiner: {forget_weight: 0.1}``); a mapping with its own ``_base``, or whose ``type``
    differs from the base's, replaces it (another registered choice starts from that choice's
    defaults, not the other's fields); a string naming the base mapping's own ``type`` keeps it."""
    out = _deepcopy(base)
    for k, v in top.items():
        old = out.get(k)
        if isinstance(v, dict) and isinstance(old, dict) and not ("_base" in v or v.get("type", old.get("type"))
                                                                  != old.get("type")):
            out[k] = deep_merge(old, v)
        elif isinstance(v, str) and isinstance(old, dict) and old.get("type") == v:
            pass  # naming a registered choice's own type again keeps its settings
        elif isinstance(v, dict) and isinstance(old, str) and "_base" not in v and "type" not in v:
            out[k] = {"_base": old, **_deepcopy(v)}
        else:
            out[k] = _deepcopy(v)
    return out


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _choice_registry_in(tp) -> type | None:
    """The registry inside ``tp`` (``X``, ``X | None``) when ``X`` is a ``draccus`` choice type
    (a base class whose registered dataclasses are chosen by a ``type`` key), if any."""
    for a in (tp, *typing.get_args(tp)):
        if isinstance(a, type) and hasattr(a, "get_known_choices") and not dataclasses.is_dataclass(a):
            return a
    return None


def _build_choice(registry: type, value: Any, where: str) -> Any:
    """A registered choice from its name (``nll``), a mapping with its ``type``, or an instance."""
    if isinstance(value, registry):
        return value
    if isinstance(value, str):
        value = {"type": value}
    elif isinstance(value, dict) and "_base" in value:
        if value.get("type", value["_base"]) != value["_base"]:
            raise ConfigError(f"{where} is both {value['_base']!r} and type {value['type']!r}; give one type.")
        value = {"type": value["_base"], **{k: v for k, v in value.items() if k != "_base"}}
    choices = registry.get_known_choices()
    names = ", ".join(choices)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}={value!r} must name one of {names} or be a mapping with a type "
                          f"(e.g. {where}={{type: {next(iter(choices))}}}).")  # fmt: skip
    kind = value.get("type")
    if kind is None:
        raise ConfigError(f"{where} has no type; set {where}.type to one of {names}.")
    if kind not in choices:
        raise ConfigError(f"{where}.type={kind!r} is not one of {names}; e.g. {where}.type={next(iter(choices))}.")
    sub = choices[kind]
    rest = {k: v for k, v in value.items() if k != "type"}
    own = [f.name for f in dataclasses.fields(sub)]
    unknown = [k for k in rest if k not in own]
    if unknown:
        keys = ", ".join(f"{where}.{k}" for k in unknown)
        owners = [n for n, c in choices.items() if all(k in {f.name for f in dataclasses.fields(c)} for k in unknown)]
        example = ", ".join(f"{k}: {rest[k]}" for k in unknown)
        near = [m for k in unknown for m in difflib.get_close_matches(k, own, n=1)]
        if owners:
            fix = (f"{' and '.join(unknown)} belong{'s' if len(unknown) == 1 else ''} to {', '.join(owners)}: write "
                   f"e.g. {where}={{type: {owners[0]}, {example}}}")
        else:
            fix = f"did you mean {', '.join(f'{where}.{m}' for m in near)}?" if near else "drop it"
        raise ConfigError(
            f"{keys} {'is not a setting' if len(unknown) == 1 else 'are not settings'} of {where}.type={kind} "
            f"(its settings: {', '.join(own) or 'none'}); {fix}."
        )
    return build(sub, rest, where=where)


def _dataclass_in(tp) -> type | None:
    """The dataclass type inside ``tp`` (``X``, ``X | None``), if any."""
    if dataclasses.is_dataclass(tp):
        return tp
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            if dataclasses.is_dataclass(a):
                return a
    return None


def _resolve_reference(value: Any, subdir: str | None, where: str) -> dict:
    """A config reference (name/path, or a mapping with ``_base``) -> mapping."""
    if isinstance(value, str):
        return load_yaml(resolve_config_path(value, subdir))
    if isinstance(value, dict) and "_base" in value:
        rest = {k: v for k, v in value.items() if k != "_base"}
        base = value["_base"]
        if base is None:
            return rest
        return deep_merge(_resolve_reference(base, subdir, where), rest)
    if isinstance(value, dict):
        return value
    raise ConfigError(
        f"{where} must be a mapping or the name of a config file, got {type(value).__name__} {value!r}."
    )


def build(cls: type[T], data: Mapping[str, Any] | None, *, where: str = "config") -> T:
    """Make a ``cls`` dataclass from a mapping; unknown keys and bad types raise :class:`ConfigError`."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    types_ = _field_types(cls)
    unknown = [k for k in data if k not in fields]
    renamed = getattr(cls, "RENAMED", {})  # old keys -> the keys that replaced them (relative to `where`)
    for k in unknown:
        if k in renamed:
            path = f"{where}.{k}".removeprefix("config.")
            new = [f"{where}.{n}".removeprefix("config.") for n in renamed[k]]
            hint = getattr(cls, "RENAMED_HINTS", {}).get(k, "")
            raise ConfigError(f"{path}={data[k]!r}: this key is now {' and '.join(new)}; write "
                              f"{' '.join(f'{n}={data[k]}' for n in new)}{hint}{getattr(cls, 'RENAMED_NOTE', '')}.")
    if unknown:
        names = ", ".join(repr(f"{where}.{k}".removeprefix("config.")) for k in unknown)
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {names}"
            f" in {cls.__name__}; valid keys are: {', '.join(sorted(fields))}."
        )
    kwargs = {}
    for name, value in data.items():
        tp = types_[name]
        sub = _dataclass_in(tp)
        path = f"{where}.{name}" if where != "config" else name
        registry = _choice_registry_in(tp)
        if registry is not None and value is not None:
            kwargs[name] = _build_choice(registry, value, path)
        elif sub is not None and value is not None:
            default = fields[name].default
            if isinstance(value, dict) and "_base" not in value and isinstance(default, str):
                value = {"_base": default, **value}  # an inline section extends the default config
            mapping = _resolve_reference(value, fields[name].metadata.get("config_dir"), path)
            kwargs[name] = build(sub, mapping, where=path)
        else:
            kwargs[name] = _check_type(value, tp, path)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        raise ConfigError(
            f"{cls.__name__} ({where}) is missing required key(s): {', '.join(missing)}; "
            "set them in the YAML file or with key=value overrides."
        )
    obj = cls(**kwargs)
    # Fill defaulted dataclass fields from references (e.g. a default method name).
    for name, f in fields.items():
        if name in kwargs:
            continue
        sub = _dataclass_in(types_[name])
        val = getattr(obj, name)
        if sub is not None and isinstance(val, str):
            path = f"{where}.{name}" if where != "config" else name
            mapping = _resolve_reference(val, f.metadata.get("config_dir"), path)
            obj = dataclasses.replace(obj, **{name: build(sub, mapping, where=path)})
    return obj


_SCALARS = (bool, int, float, str, type(None))


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently coerce: int -> float, list -> tuple) a value against a type hint."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None and len(non_none) < len(args):
            return None
        if len(non_none) == 1:
            return _check_type(value, non_none[0], where)
        errors = []
        for a in non_none:
            try:
                return _check_type(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}={value!r} does not match {_type_name(tp)}.")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}={value!r} is not one of {', '.join(map(repr, args))}.")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r} must be a list.")
        item = args[0] if args else Any
        vals = [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(vals) if origin is tuple else vals
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r} must be a mapping.")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}={value!r} must be a number.")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}={value!r} must be an integer.")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} must be true or false.")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r} must be a string.")
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}={value!r} must be null.")
        return None
    return value


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = (), *, subdir: str | None = None
) -> T:
    """Read ``path`` (or start empty), apply ``key=value`` overrides and build ``cls``.

    A top-level ``_base: other.yaml`` key in a file merges that file underneath.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = _load_with_base(
            resolve_config_path(path, subdir) if not Path(path).is_file() else Path(path), subdir
        )
    data = apply_overrides(data, overrides)
    return build(cls, data)


def _load_with_base(path: Path, subdir: str | None = None, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    here = Path(os.path.abspath(path)).resolve()
    if here in chain:
        loop = " -> ".join(str(p) for p in (*chain[chain.index(here):], here))
        raise ConfigError(f"_base in {chain[-1]} makes a cycle ({loop}); a config cannot extend itself: "
                          "point _base at another file.")  # fmt: skip
    data = load_yaml(path)
    base = data.pop("_base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"_base in {path} is {base!r}; it must be a config name or file path.")
    base_path = Path(base)
    if not base_path.is_absolute():
        cand = path.parent / base_path
        base_path = cand if cand.is_file() else resolve_config_path(base, subdir)
    return deep_merge(_load_with_base(base_path, subdir, (*chain, here)), data)


def to_dict(cfg: Any) -> Any:
    """A dataclass config as plain YAML-friendly data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        out = {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
        if hasattr(cfg, "get_choice_name"):  # a registered choice: its type first (draccus's encoding)
            out = {"type": type(cfg).get_choice_name(type(cfg)), **out}
        return out
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg
