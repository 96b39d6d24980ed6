"""The one YAML loader of the project (search spaces, targets files, configs): safe, and strict where
plain YAML is silently surprising.

- A key written twice in one mapping is refused, naming the key and both lines (PyYAML keeps the
  last one without a word: a search space with ``lr_gen`` added at the top of ``defaults`` ran with
  the old value).
- ``1e-4``, ``-1e-4``, ``+2E3``, ``5e0`` are floats, as they look (YAML 1.1 reads a float only with
  a dot in the mantissa, so ``-1e-4`` was the string '-1e-4').

Built on ``yaml.SafeLoader``: no Python objects are ever constructed from a file.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

__all__ = ["StrictLoader", "loads", "load_file", "YAMLFileError"]


class YAMLFileError(ValueError):
    """A YAML file (or text) that does not parse, or writes a key twice; the message names the place."""


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys and reads exponent floats without a dot."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:            # an unhashable key: SafeLoader's own error says so
                    break
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is written twice (lines {first} and {line}) — keep one",
                        key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


# YAML 1.1's float pattern plus the exponent forms without a dot (1e-4, -1e-4, 5E+3)
StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def loads(text: str, where: str = "<text>"):
    """Parse YAML text strictly; errors name ``where`` and the line."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 -- StrictLoader is a SafeLoader
    except yaml.YAMLError as e:
        raise YAMLFileError(f"{where} is not valid YAML: {_describe(e)}") from None


def load_file(path, what: str = ""):
    """Parse the YAML file ``path`` strictly. ``what`` (e.g. '--targets-file') starts the messages."""
    path = Path(path)
    where = f"{what} {path}".strip()
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise YAMLFileError(f"{where} is not a text file ({e.reason} at byte {e.start}) — give a YAML file") from None
    except OSError as e:
        raise YAMLFileError(f"{where} cannot be read ({e.strerror or e}) — check the path and its permissions") from None
    return loads(text, where)


def _describe(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    return f"line {mark.line + 1}: {problem}" if mark is not None else problem
