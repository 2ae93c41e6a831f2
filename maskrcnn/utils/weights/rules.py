"""The renaming engine of the weight converters: an ordered table of ``(pattern -> template)`` rules.

Each converter describes how one zoo's tensor names map to another naming (its names -> canonical names, and back)
as a :class:`RuleTable`; only what renaming cannot express (AffineChannel -> batch norm, background rows, anchor
order, ...) stays code in the converter. A rule's ``pattern`` is a regular expression that must match the whole name;
its named groups, after an optional translation (``values``), and the table's context fill the ``template``
(``str.format`` syntax). The first matching rule wins; a rule whose template is None drops the tensor (SGD state,
counters, classifier heads), and a name no rule matches is an error listing every such name.

Example (torchvision's ResNet stages ``layer1..4`` are Detectron's ``res2..5``)::

    Rule(r"layer(?P<s>[1-4])\\.(?P<rest>.+)", "res{s}.{rest}", values={"s": plus(1)})
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from .common import WeightsConversionError, raise_unmapped

__all__ = ["Rule", "RuleTable", "plus", "inverse", "PARAM"]

#: How a group value is translated before it fills the template: a lookup table (a value missing from it means the
#: rule does not match) or a function (returning None means the rule does not match).
Translation = Union[Mapping[str, str], Callable[[str], Optional[Any]]]

#: A parameter of a conv, linear or GroupNorm layer (the usual last name component).
PARAM = r"(?P<p>weight|bias)"


def plus(n: int) -> Callable[[str], int]:
    """Translation adding ``n`` to an integer group (index shifts such as ``layer1`` -> ``res2``)."""
    return lambda value: int(value) + n


def inverse(table: Mapping[str, str]) -> Dict[str, str]:
    """A lookup translation read backwards (for the table of the opposite direction)."""
    return {v: k for k, v in table.items()}


@dataclass(frozen=True)
class Rule:
    """``pattern`` (full match, named groups) -> ``template`` (``str.format`` over the groups and the table's
    context, or a function of those fields returning the name); ``template=None`` drops the tensor."""

    pattern: str
    template: Union[str, Callable[[Dict[str, Any]], str], None]
    values: Mapping[str, Translation] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_regex", re.compile(self.pattern))

    def fields(self, name: str) -> Optional[Dict[str, Any]]:
        """The template fields for ``name`` (unmatched optional groups are ""), or None if the rule does not
        match."""
        m = self._regex.fullmatch(name)  # type: ignore[attr-defined]
        if m is None:
            return None
        fields: Dict[str, Any] = {k: ("" if v is None else v) for k, v in m.groupdict().items()}
        for key, translate in self.values.items():
            value = translate(fields[key]) if callable(translate) else translate.get(fields[key])
            if value is None:
                return None
            fields[key] = value
        return fields


_DROP = object()


class RuleTable:
    """An ordered list of :class:`Rule` s for one direction of one format.

    Args:
        source: what the names come from, for messages ("this Detectron file", "the canonical weights").
        target: what they are renamed to, for messages.
        rules: tried in order; the first match renames.
        hint: appended to the error listing unmapped names (what is not supported).
    """

    def __init__(self, source: str, target: str, rules: Iterable[Rule], hint: str = "") -> None:
        self.source, self.target, self.hint = source, target, hint
        self.rules: Tuple[Rule, ...] = tuple(rules)

    def rename(self, name: Any, context: Optional[Mapping[str, Any]] = None) -> Any:
        """The new name of ``name``; None when no rule matches, :data:`_DROP` when a rule drops it."""
        if not isinstance(name, str):
            return None
        for rule in self.rules:
            fields = rule.fields(name)
            if fields is None:
                continue
            if rule.template is None:
                return _DROP
            fields = {**(context or {}), **fields}
            return rule.template(fields) if callable(rule.template) else rule.template.format(**fields)
        return None

    def apply(self, named: Mapping[Any, Any], context: Optional[Mapping[str, Any]] = None,
              convert: Optional[Callable[[Any, str], Any]] = None) -> Tuple["OrderedDict[str, Any]", List[str]]:
        """Rename every entry of ``named``: ``(renamed, dropped_names)``, in ``named``'s order.

        ``convert(value, old_name)`` turns each kept value into the output's type (e.g. :func:`to_tensor`); None
        keeps values as they are. Raises :class:`WeightsConversionError` listing every name no rule matches, and
        when two names land on the same new name.
        """
        out: "OrderedDict[str, Any]" = OrderedDict()
        origin: Dict[str, str] = {}
        dropped: List[str] = []
        unmapped: List[str] = []
        for name, value in named.items():
            new = self.rename(name, context)
            if new is None:
                unmapped.append(name if isinstance(name, str) else repr(name))
            elif new is _DROP:
                dropped.append(name)
            elif new in origin:
                raise WeightsConversionError(f"{self.source}: {origin[new]!r} and {name!r} both map to {new!r} in "
                                             f"{self.target}; a file holds each tensor once")
            else:
                origin[new] = name
                out[new] = convert(value, name) if convert is not None else value
        raise_unmapped(self.source, self.target, unmapped, self.hint)
        return out, dropped
