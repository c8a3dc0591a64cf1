"""The YAML dialect of recipes: safe, `1e-3` is a float, dates stay strings, no duplicate keys.

`Loader` reads recipe files and override values; `Dumper` writes resolved recipes so that
`Loader` reads them back equal.
"""

import re

import yaml

_FLOAT = re.compile(r"[-+]?([0-9][0-9_]*(\.[0-9_]*)?|\.[0-9_]+)([eE][-+]?[0-9]+)\Z")


class Loader(yaml.SafeLoader):
    """Safe YAML, plus: `1e-3` is a float, dates stay strings, duplicate keys are errors."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if key.value in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping",
                        node.start_mark,
                        f"duplicate key {key.value!r}",
                        key.start_mark,
                    )
                seen.add(key.value)
        return super().construct_mapping(node, deep)


class Dumper(yaml.SafeDumper):
    """Quotes exactly the strings that `Loader` would read as something else."""


for _cls in (Loader, Dumper):
    _cls.yaml_implicit_resolvers = {
        first: [r for r in rs if r[0] != "tag:yaml.org,2002:timestamp"]
        for first, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+.0123456789"))


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error as one problem line: `line L, column C: invalid YAML: what`."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    what = getattr(err, "problem", None) or str(err)
    return f"{where}invalid YAML: {what}"
