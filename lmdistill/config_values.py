"""Values from YAML recipes and ``section.field=value`` overrides, read as the config's types.

:func:`build_section` makes one config section from a mapping, refusing unknown fields; :func:`coerce_value`
converts one value to its field's type (``"1e-3"`` to a float, ``"0,2,4"`` to a list, ``yes`` to
True), or fails naming the field and an example of a good value.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, get_args, get_origin, get_type_hints

from .errors import ConfigError


def build_section(section_cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"config section {prefix} must be a mapping, got {values!r}; write it as '{prefix}:' "
                          f"followed by indented 'field: value' lines")
    hints = get_type_hints(section_cls)
    known = {f.name for f in fields(section_cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown config field(s) {', '.join(f'{prefix}.{u}' for u in sorted(unknown))}; valid: {', '.join(sorted(known))}")
    converted = {name: coerce_value(value, hints[name], f"{prefix}.{name}") for name, value in values.items()}
    return section_cls(**converted)


_EXAMPLES = {int: "a whole number such as 100", float: "a number such as 2.5e-4", bool: "true or false"}


def coerce_value(value: Any, hint: Any, name: str) -> Any:
    """Convert a YAML or command-line value to the field's type, or fail naming the field."""
    if value is None or (isinstance(value, str) and value in ("None", "none", "null")):
        if type(None) in get_args(hint):
            return None
        raise ConfigError(f"config value {name} may not be empty")
    args = [a for a in get_args(hint) if a is not type(None)]
    target = args[0] if get_origin(hint) is not list and args else hint
    origin = get_origin(target)
    try:
        if origin is list:
            (item,) = get_args(target)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            elif not isinstance(value, (list, tuple)):
                value = [value]  # a single value for a list field: model.layers=3
            return [coerce_value(v, item, name) for v in value]
        if target is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if target in (int, float) and isinstance(value, bool):
            raise ValueError(value)  # YAML's true/false are not numbers here
        if target is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and ("e" in value.lower()) else int(value)
        if target is float:
            return float(value)
        if target is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config value {name}: cannot read {value!r} as {getattr(target, '__name__', target)}; "
                          f"give {_EXAMPLES.get(target, 'a value of that type')}") from None
    return value
