"""The `--config` YAML file, read within limits: a config of flags is a few hundred bytes of flat keys, so the reader
refuses what only an attack or an accident produces (e.g. a 1 KB "billion laughs" alias bomb that expands to
millions of values, and before these limits made the CLI hang past 300 s at 4.9 GB):

- a file larger than `MAX_CONFIG_BYTES`;
- a value that expands to more than `MAX_CONFIG_VALUES` values, an alias counted as often as it is used (so an
  alias bomb is refused after a few of its levels, before anything is expanded), and an alias inside the value it
  names (a recursive one);
- lists and mappings nested deeper than `MAX_CONFIG_DEPTH`;
- a key given twice in one mapping (YAML would silently keep the last).

Plain aliases and merge keys (`<<: *defaults`) stay allowed within those limits. Every refusal is a `ValueError`
with the file, line and column, and what the limit is.
"""

import os

import yaml

from ..bounded import bounded_repr, bounded_text


MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 10_000
MAX_CONFIG_DEPTH = 32


class _LimitedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, plus the limits above: sizes are counted on the composed nodes (before any Python
    object is built), where an alias is one shared node whose size is already known."""

    def __init__(self, stream):
        super().__init__(stream)
        self._sizes = {}  # id(node) -> the number of values it expands to, itself included
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = self.anchors.get(event.anchor)
            if node is not None and id(node) not in self._sizes:  # its own value is still being composed
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"the alias *{event.anchor} is used inside the value it names (a recursive alias)",
                    event.start_mark,
                )
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_CONFIG_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"lists or mappings nested more than {MAX_CONFIG_DEPTH} levels deep", event.start_mark
            )
        node = super().compose_node(parent, index)
        self._depth -= 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = ()
        size = 1 + sum(self._sizes[id(child)] for child in children)
        if size > MAX_CONFIG_VALUES:
            raise yaml.composer.ComposerError(
                None,
                None,
                f"a value that expands to more than {MAX_CONFIG_VALUES} values, each alias counted as "
                "often as it is used (an alias bomb?)",
                event.start_mark,
            )
        self._sizes[id(node)] = size
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_marks = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # merged keys may be overridden: that is what a merge key is for
                key = self.construct_object(key_node)
                try:
                    hash(key)
                except TypeError:
                    continue  # PyYAML refuses it itself
                if key in first_marks:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"the key {bounded_repr(key)} is given twice (first on line "
                        f"{first_marks[key].line + 1}); YAML would silently keep the last",
                        key_node.start_mark,
                    )
                first_marks[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


def read_config_file(path: str | os.PathLike) -> dict:
    """The mapping of flag names to values in the YAML file at `path`, within the limits above."""
    path = os.fspath(path)
    shown = bounded_repr(path)
    if not os.path.isfile(path):
        raise ValueError(f"--config {shown}: no such file. Pass the path of a YAML file whose keys are flag names.")
    with open(path, "rb") as file:
        data = file.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(
            f"--config {shown} is larger than {MAX_CONFIG_BYTES} bytes, the most a config file may be (a config of "
            "flags is a few KB): pass a config of flag names and values, not data."
        )
    try:
        config = yaml.load(data, Loader=_LimitedLoader)  # bytes: PyYAML detects UTF-8/16 and names a bad byte
    except yaml.YAMLError as error:  # one line with file, line and column, not a parser traceback
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        context = getattr(error, "context", None)
        raise ValueError(
            f"--config {bounded_text(where, 500)}: not valid YAML: {problem}" + (f" ({context})" if context else "")
        ) from None
    if not isinstance(config, dict):
        raise ValueError(
            f"--config {shown} must hold a YAML mapping of flag names to values, got {type(config).__name__}."
        )
    return config
