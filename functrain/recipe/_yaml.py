"""The YAML dialect of recipes: safe, `1e-3` is a float, dates stay strings, no duplicate keys.

`Loader` reads recipe files and override values; `Dumper` writes resolved recipes so that
`Loader` reads them back equal. `Loader` also bounds what one document may hold
(`MAX_VALUES`, `MAX_DEPTH`), an alias counting every value it names each time it is used,
so an alias bomb ("billion laughs") is refused before anything expands it.
"""

import re

import yaml

_FLOAT = re.compile(r"[-+]?([0-9][0-9_]*(\.[0-9_]*)?|\.[0-9_]+)([eE][-+]?[0-9]+)\Z")

#: The most values (scalars, lists, mappings) one document may hold, aliases expanded.
MAX_VALUES = 100_000
#: The deepest one document may nest lists and mappings.
MAX_DEPTH = 100


class BoundError(yaml.MarkedYAMLError):
    """A document past `MAX_VALUES` or `MAX_DEPTH`, an alias inside the value it names, or
    an integer too long for Python to read."""


class Loader(yaml.SafeLoader):
    """Safe YAML, plus: `1e-3` is a float, dates stay strings, duplicate keys are errors,
    and a document is refused past `MAX_VALUES` values (aliases expanded) or `MAX_DEPTH`."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._values = 0  # values composed so far, an alias counting all those it names
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> its values, aliases expanded

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        event = self.peek_event()
        mark = event.start_mark
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)  # the named node itself, not a copy
            size = self._sizes.get(id(node))
            if size is None:  # the node is still being composed: the alias is inside it
                raise BoundError(
                    problem=f"alias *{event.anchor} refers to itself (it is inside the value "
                    "it names); write the value out",
                    problem_mark=mark,
                )
            self._count(size, mark, f"alias *{event.anchor} takes the recipe past")
            return node
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise BoundError(
                problem=f"lists and mappings nest more than {MAX_DEPTH} deep; flatten them",
                problem_mark=mark,
            )
        before = self._values
        self._count(1, mark, "the recipe holds more than")
        node = super().compose_node(parent, index)
        self._sizes[id(node)] = self._values - before
        self._depth -= 1
        return node

    def _count(self, values: int, mark: yaml.Mark, what: str) -> None:
        self._values += values
        if self._values > MAX_VALUES:
            raise BoundError(
                problem=f"{what} {MAX_VALUES} values (an alias counts every value it names, "
                "each time it is used); a recipe is configuration: keep data in the files it "
                "names",
                problem_mark=mark,
            )

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

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError as err:  # past Python's limit on the digits int() reads
            raise BoundError(
                problem=f"an integer of {len(node.value)} characters; a recipe's integers are "
                "at most 2**63 - 1 (int64)",
                problem_mark=node.start_mark,
            ) from err


class Dumper(yaml.SafeDumper):
    """Quotes exactly the strings that `Loader` would read as something else."""


for _cls in (Loader, Dumper):
    _cls.yaml_implicit_resolvers = {
        first: [r for r in rs if r[0] != "tag:yaml.org,2002:timestamp"]
        for first, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+.0123456789"))
Loader.add_constructor("tag:yaml.org,2002:int", Loader.construct_yaml_int)


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error as one problem line: `line L, column C: invalid YAML: what` (a
    `BoundError` says only what)."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    what = getattr(err, "problem", None) or str(err)
    return f"{where}{'' if isinstance(err, BoundError) else 'invalid YAML: '}{what}"
