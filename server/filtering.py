"""ListData's filter and order_by: an AIP-160 subset, compiled to SQL over the catalog's tables.

    latitude >= 43.5 AND latitude <= 43.7 AND acquired_at >= "2024-05-01T00:00:00Z"
    tags:"field" AND NOT software:*
    filename = "*.jpg" OR (size > 1000000 AND content_type = "image/tiff")

As AIP-160 defines it, OR binds tighter than AND (`a AND b OR c` is `a AND (b OR c)`), and
terms side by side are ANDed (`a b` is `a AND b`). A comparison only matches items that have the
field, and NOT matches exactly the items its operand does not: comparisons compile to
`col IS NOT NULL AND col op value`, so NOT never meets SQL's NULL.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import (
    LarkError,
    UnexpectedCharacters,
    UnexpectedEOF,
    UnexpectedInput,
    VisitError,
)
from sqlalchemy import Column, Table, and_, exists, not_, or_, select, true
from sqlalchemy.sql.elements import ColumnElement

from metalake.metadata import FIELDS, FLOAT_FIELDS, STRING_FIELDS, parse_datetime
from server.schema import data_table, data_tags_table, event_tags_table, events_table

MAX_FILTER_LENGTH = 4096
MAX_DEPTH = 32

_NUMBER_FIELDS = FLOAT_FIELDS | {"size"}
_TIME_FIELDS = frozenset({"acquired_at", "created_at", "updated_at"})
_TEXT_FIELDS = STRING_FIELDS | {"filename", "content_type"}
_OPTIONAL_FIELDS = frozenset(FIELDS)  # the metadata fields may be absent; the others never are
FILTERABLE_FIELDS = _NUMBER_FIELDS | _TIME_FIELDS | _TEXT_FIELDS
ORDERABLE_FIELDS = FILTERABLE_FIELDS
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_GRAMMAR = r"""
?start: expression
      |                                  -> empty
?expression: sequence
           | expression AND sequence     -> and_
?sequence: factor
         | sequence factor               -> and_
?factor: term
       | factor OR term                  -> or_
?term: simple
     | NOT term                          -> not_
     | "-" simple                        -> not_
?simple: restriction
       | "(" expression ")"
restriction: FIELD COMPARATOR value      -> compare
           | FIELD ":" value             -> has
?value: STRING                           -> string
      | NUMBER                           -> number
      | WORD                             -> word
      | "*"                              -> star

AND.3: "AND"
OR.3: "OR"
NOT.3: "NOT"
COMPARATOR: "<=" | ">=" | "!=" | "=" | "<" | ">"
FIELD.2: /[a-z_][a-z0-9_]*/
NUMBER.2: /-?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?/
STRING: /"(\\.|[^"\\])*"/ | /'(\\.|[^'\\])*'/
WORD: /[A-Za-z_][A-Za-z0-9_.\-]*/
%ignore /\s+/
"""

_parser = Lark(_GRAMMAR, parser="lalr", maybe_placeholders=False)


class FilterError(ValueError):
    """A filter or order_by that cannot be used; the message points at the problem."""

    def __init__(self, message: str, position: int | None = None) -> None:
        self.position = position
        super().__init__(message)


@dataclass(frozen=True)
class FilterTarget:
    """The tables a filter runs over: rows shaped like `data`, and their tags."""

    table: Table
    tags: Table
    tags_key: Column[Any]  # the tags' reference to a row
    key: Column[Any]  # a row's own key


ITEMS = FilterTarget(data_table, data_tags_table, data_tags_table.c.data_id, data_table.c.id)
EVENTS = FilterTarget(events_table, event_tags_table, event_tags_table.c.seq, events_table.c.seq)


@dataclass(frozen=True)
class OrderKey:
    field: str
    descending: bool


def compile_filter(text: str, target: FilterTarget = ITEMS) -> ColumnElement[bool] | None:
    """The SQL condition for an AIP-160 filter over `target`; None for a blank one."""
    if not text.strip():
        return None
    if len(text) > MAX_FILTER_LENGTH:
        raise FilterError(f"is {len(text)} characters long; at most {MAX_FILTER_LENGTH}")
    try:
        tree = _parser.parse(text)
    except UnexpectedInput as error:
        raise _syntax_error(text, error) from None
    except LarkError as error:  # pragma: no cover - lark's other errors are grammar bugs
        raise FilterError(f"cannot be parsed: {error}") from None
    _check_depth(tree)
    try:
        condition: ColumnElement[bool] | None = _ToSql(target).transform(tree)
    except VisitError as error:
        if isinstance(error.orig_exc, FilterError):
            raise error.orig_exc from None
        raise
    return condition


def parse_order_by(text: str) -> list[OrderKey]:
    """AIP-132 order_by: `field [desc|asc], ...`; empty gives []."""
    keys = []
    for part in text.split(","):
        words = part.split()
        if not words:
            if text.strip():
                raise FilterError(f"has an empty term in {text!r}")
            continue
        if len(words) > 2 or (len(words) == 2 and words[1].lower() not in ("asc", "desc")):
            raise FilterError(f"term {part.strip()!r} must be `field` or `field desc`")
        if words[0] not in ORDERABLE_FIELDS:
            raise FilterError(
                f"cannot order by {words[0]!r}; valid fields: {', '.join(sorted(ORDERABLE_FIELDS))}"
            )
        keys.append(OrderKey(words[0], len(words) == 2 and words[1].lower() == "desc"))
    fields = [k.field for k in keys]
    if len(set(fields)) != len(fields):
        raise FilterError("names a field twice")
    return keys


def _syntax_error(text: str, error: UnexpectedInput) -> FilterError:
    position = error.pos_in_stream if isinstance(error.pos_in_stream, int) else None
    token = getattr(error, "token", None)
    if isinstance(error, UnexpectedEOF) or getattr(token, "type", None) == "$END":
        return FilterError(
            f"ends too early: {text.strip()!r} lacks a value, a term or a ')'", len(text)
        )
    if isinstance(error, UnexpectedCharacters):
        what = f"unexpected {text[position : (position or 0) + 10]!r}"
    else:
        what = f"unexpected {str(token)!r}"
    excerpt = text[max(0, (position or 0) - 20) : (position or 0) + 20]
    return FilterError(f"{what} at column {error.column}, in {excerpt!r}", position)


def _check_depth(tree: Tree[Token]) -> None:
    # Iterative, so that a hostile filter cannot exhaust the stack before being refused.
    stack: list[tuple[Tree[Token] | Token, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise FilterError(f"nests deeper than {MAX_DEPTH} levels")
        if isinstance(node, Tree):
            stack.extend((child, depth + 1) for child in node.children)


@dataclass(frozen=True)
class _Value:
    kind: str  # string, number, word, star
    text: str


def _unquote(token: str) -> str:
    body = token[1:-1]
    out, escaped = [], False
    for char in body:
        if escaped:
            out.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        else:
            out.append(char)
    return "".join(out)


@v_args(inline=True)
class _ToSql(Transformer[Token, Any]):
    def __init__(self, target: FilterTarget) -> None:
        super().__init__()
        self._target = target

    def empty(self) -> None:
        return None

    def and_(self, left: Any, *rest: Any) -> ColumnElement[bool]:
        right = rest[-1]  # the AND token, if kept, comes between
        return and_(left, right)

    def or_(self, left: Any, *rest: Any) -> ColumnElement[bool]:
        return or_(left, rest[-1])

    def not_(self, *parts: Any) -> ColumnElement[bool]:
        negated: ColumnElement[bool] = not_(parts[-1])
        return negated

    def string(self, token: Token) -> _Value:
        return _Value("string", _unquote(str(token)))

    def number(self, token: Token) -> _Value:
        return _Value("number", str(token))

    def word(self, token: Token) -> _Value:
        return _Value("word", str(token))

    def star(self) -> _Value:
        return _Value("star", "*")

    def has(self, field: Token, value: _Value) -> ColumnElement[bool]:
        name = str(field)
        if name == "tags":
            target = self._target
            conditions = [target.tags_key == target.key]
            if value.kind != "star":
                conditions.append(target.tags.c.tag == value.text)
            tagged = select(target.tags_key).where(*conditions).correlate(target.table)
            return exists(tagged)
        _check_field(name, field)
        if value.kind != "star":
            raise FilterError(
                f"{name}:{value.text} is not supported: ':' tests tags (tags:\"x\") or "
                f"presence ({name}:*)",
                field.start_pos,
            )
        column = self._target.table.c[name]
        return column.is_not(None) if name in _OPTIONAL_FIELDS else true()

    def compare(self, field: Token, operator: Token, value: _Value) -> ColumnElement[bool]:
        name, op = str(field), str(operator)
        if name == "tags":
            raise FilterError('tags are tested with ":", as in tags:"x"', field.start_pos)
        _check_field(name, field)
        column = self._target.table.c[name]
        if name in _NUMBER_FIELDS:
            if value.kind != "number":
                raise FilterError(f"{name} is a number; {value.text!r} is not", field.start_pos)
            if name == "size" and not value.text.lstrip("-").isdigit():
                raise FilterError(f"size is a whole number of bytes, not {value.text}")
            operand: Any = int(value.text) if name == "size" else float(value.text)
        elif name in _TIME_FIELDS:
            operand = _micros(name, value, field.start_pos)
        else:
            if value.kind == "star":
                raise FilterError(f"compare {name} with a quoted string", field.start_pos)
            if op in ("=", "!=") and "*" in value.text:
                return _wildcard(column, value.text, negate=op == "!=")
            operand = value.text
        condition: ColumnElement[bool] = _COMPARE[op](column, operand)
        if name in _OPTIONAL_FIELDS:
            condition = and_(column.is_not(None), condition)
        return condition


_COMPARE: dict[str, Any] = {
    "=": lambda c, v: c == v,
    "!=": lambda c, v: c != v,
    "<": lambda c, v: c < v,
    "<=": lambda c, v: c <= v,
    ">": lambda c, v: c > v,
    ">=": lambda c, v: c >= v,
}


def _check_field(name: str, token: Token) -> None:
    if name not in FILTERABLE_FIELDS and name != "tags":
        raise FilterError(
            f"unknown field {name!r} at column {token.column}; valid fields: "
            f"{', '.join(sorted(FILTERABLE_FIELDS | {'tags'}))}",
            token.start_pos,
        )


def _micros(name: str, value: _Value, position: int | None) -> int:
    if value.kind != "string":
        raise FilterError(
            f'{name} is a time: compare it with an RFC 3339 string like "2024-05-01T00:00:00Z"',
            position,
        )
    try:
        moment = parse_datetime(value.text)
    except ValueError as error:
        raise FilterError(f"{name}: {error}", position) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # as stored: offset-less times compare as UTC
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _wildcard(column: Any, pattern: str, *, negate: bool) -> ColumnElement[bool]:
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    like = column.like(escaped.replace("*", "%"), escape="\\")
    condition: ColumnElement[bool] = and_(column.is_not(None), not_(like) if negate else like)
    return condition
