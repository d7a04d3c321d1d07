"""ListData's filter and order_by: an AIP-160 subset, compiled to SQL over the catalog's tables.

    latitude >= 43.5 AND latitude <= 43.7 AND acquired_at >= "2024-05-01T00:00:00Z"
    tags:"field" AND NOT software:*
    filename = "*.jpg" OR (size > 1000000 AND content_type = "image/tiff")

The language (https://google.aip.dev/160):

- `field op literal`, op one of `= != < <= > >=`, on every metadata field (also spelled
  `metadata.latitude`) and on filename, size, content_type, created_at and updated_at.
- Literals: numbers (`-1.5e3`), strings in double or single quotes with backslash escapes
  (`\\n \\t \\" \\' \\\\ \\*`), and bare words (`manufacturer = Canon`, `reference = 7NGOMI`).
  Times (acquired_at, created_at, updated_at) take RFC 3339 strings; one without an offset is
  UTC, as offset-less times are stored. `size` takes whole numbers.
- `=` and `!=` on text treat `*` as a wildcard (`filename = "IMG_*.jpg"`); `\\*` is a star.
- `tags:"x"` is true when the item has the tag (wildcards too); `field:*` when it has the field.
- `labels.KEY op "text"` compares a label's value (text, in code point order; `*` wildcards with
  `=` and `!=`); `labels.KEY:*` is true when the item has the label. As with fields, a
  comparison never matches an item without the label.
- `AND`, `OR`, `NOT` (or `-`), parentheses; terms side by side are ANDed (`a b` is `a AND b`).

Precedence follows AIP-160, which is NOT the usual one: OR binds tighter than AND and than
juxtaposition, so `a AND b OR c` is `a AND (b OR c)`, and `a b OR c` is `a AND (b OR c)`.
Write parentheses when in doubt.

A comparison only matches items that have the field, and NOT matches exactly the items its operand
does not: comparisons compile to `col IS NOT NULL AND col op value`, so that NOT never meets SQL's
NULL (under which `NOT (NULL = 'x')` would be neither true nor false, and drop the row).

Limits keep a hostile filter cheap to refuse: MAX_FILTER_LENGTH characters, MAX_DEPTH levels of
nesting (checked before anything recurses over the tree) and MAX_TERMS comparisons (SQLite refuses
expressions more than 1,000 operators deep).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedInput, VisitError
from sqlalchemy import Boolean, Column, Table, and_, exists, not_, or_, select, true
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal

from metalake.labels import check_key
from metalake.metadata import FIELDS, FLOAT_FIELDS, STRING_FIELDS, parse_datetime
from metalake.server.schema import (
    data_labels_table,
    data_table,
    data_tags_table,
    event_labels_table,
    event_tags_table,
    events_table,
)

MAX_FILTER_LENGTH = 4096
MAX_DEPTH = 32
MAX_TERMS = 200

_NUMBER_FIELDS = FLOAT_FIELDS | {"size"}
_TIME_FIELDS = frozenset({"acquired_at", "created_at", "updated_at"})
_TEXT_FIELDS = STRING_FIELDS | {"filename", "content_type"}
_OPTIONAL_FIELDS = frozenset(FIELDS)  # the metadata fields may be absent; the others never are
FILTERABLE_FIELDS: frozenset[str] = _NUMBER_FIELDS | _TIME_FIELDS | _TEXT_FIELDS
ORDERABLE_FIELDS: frozenset[str] = FILTERABLE_FIELDS
_FIELD_LIST = ", ".join(sorted(FILTERABLE_FIELDS | {"tags", "labels.KEY"}))
_LABELS = "labels."
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# BIGINT's range: a size literal beyond it is clamped (no size is anywhere near), because SQLite
# cannot even bind a larger integer.
_MIN_BIGINT, _MAX_BIGINT = -(2**63), 2**63 - 1
_NUMBER = re.compile(r"-?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")

# Lists are flat (`a (AND a)*`) rather than left-recursive, so that a long chain of terms is one
# node, not one nesting level per term: depth then measures parentheses and NOTs only.
# Keywords are whole upper-case words; FIELD and BARE refuse them, so that a misplaced keyword is
# reported as such instead of being taken for a name or a value.
_GRAMMAR = r"""
?start: expression
      |                                     -> empty
?expression: sequence
           | sequence (_AND sequence)+      -> and_
?sequence: factor
         | factor factor+                   -> and_
?factor: term
       | term (_OR term)+                   -> or_
?term: simple
     | _NOT term                            -> not_
     | "-" simple                           -> not_
?simple: restriction
       | "(" expression ")"
restriction: FIELD COMPARATOR value         -> compare
           | FIELD ":" value                -> has
value: STRING | BARE | STAR

_AND.3: /AND\b/
_OR.3: /OR\b/
_NOT.3: /NOT\b/
COMPARATOR: "<=" | ">=" | "!=" | "=" | "<" | ">"
STAR: "*"
FIELD.2: /(?!(AND|OR|NOT)\b)[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*/
STRING: /"(\\[\s\S]|[^"\\])*"/ | /'(\\[\s\S]|[^'\\])*'/
BARE: /(?!(AND|OR|NOT)\b)[^\s()"'=<>!:*\\]+/
%ignore /\s+/
"""

_parser = Lark(_GRAMMAR, parser="lalr", lexer="contextual", maybe_placeholders=False)

# What the parser's terminal names mean to a user, for "expected ..." in syntax errors.
_EXPECTED = {
    "FIELD": "a field name",
    "COMPARATOR": "a comparison (=, !=, <, <=, >, >=)",
    "COLON": "':'",
    "STRING": "a value",
    "BARE": "a value",
    "STAR": "a value",
    "_AND": "AND",
    "_OR": "OR",
    "_NOT": "NOT",
    "MINUS": "'-'",
    "LPAR": "'('",
    "RPAR": "')'",
    "$END": "the end of the filter",
}


class FilterError(ValueError):
    """A filter or order_by that cannot be used; the message points at the problem.

    `position` is the 0-based offset in the text of the problem, when there is one.
    """

    def __init__(self, message: str, position: int | None = None) -> None:
        self.position = position
        super().__init__(message)


@dataclass(frozen=True)
class FilterTarget:
    """The tables a filter runs over: rows shaped like `data`, their tags and their labels."""

    table: Table
    tags: Table
    tags_key: Column[Any]  # the tags' reference to a row
    key: Column[Any]  # a row's own key
    labels: Table
    labels_key: Column[Any]  # the labels' reference to a row


ITEMS = FilterTarget(
    data_table,
    data_tags_table,
    data_tags_table.c.data_id,
    data_table.c.id,
    data_labels_table,
    data_labels_table.c.data_id,
)
EVENTS = FilterTarget(
    events_table,
    event_tags_table,
    event_tags_table.c.seq,
    events_table.c.seq,
    event_labels_table,
    event_labels_table.c.seq,
)


@dataclass(frozen=True)
class OrderKey:
    field: str
    descending: bool


def compile_filter(text: str, target: FilterTarget = ITEMS) -> ColumnElement[bool] | None:
    """The SQL condition for an AIP-160 filter over `target`; None for a blank one."""
    if len(text) > MAX_FILTER_LENGTH:
        raise FilterError(f"is {len(text)} characters long; at most {MAX_FILTER_LENGTH}")
    if not text.strip():
        return None
    if "\x00" in text:
        # No stored text holds NUL, and PostgreSQL cannot even be asked about one.
        position = text.index("\x00")
        raise FilterError(f"contains a NUL character at {_where(text, position)}", position)
    try:
        tree = _parser.parse(text)
    except UnexpectedInput as error:
        raise _syntax_error(text, error) from None
    except LarkError as error:  # pragma: no cover - lark's other errors are grammar bugs
        raise FilterError(f"cannot be parsed: {error}") from None
    _check_size(tree)
    try:
        condition: ColumnElement[bool] | None = _ToSql(text, target).transform(tree)
    except VisitError as error:
        if isinstance(error.orig_exc, FilterError):
            raise error.orig_exc from None
        raise
    return condition


def parse_order_by(text: str) -> list[OrderKey]:
    """AIP-132 order_by: `field [desc|asc], ...`; empty gives []."""
    keys: list[OrderKey] = []
    if not text.strip():
        return keys
    for part in text.split(","):
        words = part.split()
        if not words:
            raise FilterError(f"has an empty term in {text!r}")
        if len(words) > 2 or (len(words) == 2 and words[1].lower() not in ("asc", "desc")):
            raise FilterError(f"term {part.strip()!r} must be `field`, `field asc` or `field desc`")
        field = words[0].removeprefix("metadata.")
        if field not in ORDERABLE_FIELDS:
            raise FilterError(
                f"cannot order by {words[0]!r}; valid fields: {', '.join(sorted(ORDERABLE_FIELDS))}"
            )
        if any(key.field == field for key in keys):
            raise FilterError(f"names {field!r} twice")
        keys.append(OrderKey(field, len(words) == 2 and words[1].lower() == "desc"))
    return keys


def _where(text: str, position: int) -> str:
    """`column N` (1-based), with the line too when the filter spans several."""
    line = text.count("\n", 0, position) + 1
    column = position - (text.rfind("\n", 0, position) + 1) + 1
    return f"line {line}, column {column}" if "\n" in text else f"column {column}"


def _excerpt(text: str, position: int) -> str:
    start, end = max(0, position - 20), min(len(text), position + 20)
    return f"{'…' if start else ''}{text[start:end]}{'…' if end < len(text) else ''}"


def _syntax_error(text: str, error: UnexpectedInput) -> FilterError:
    token = getattr(error, "token", None)
    at_end = getattr(token, "type", None) == "$END"
    if at_end:
        position = len(text.rstrip())
        what = "the filter ends too early"
    else:
        position = error.pos_in_stream if isinstance(error.pos_in_stream, int) else 0
        if isinstance(error, UnexpectedCharacters):
            found = re.match(r"[^\s()]+|.", text[position:], re.DOTALL)
            what = f"unexpected {found.group() if found else text[position]!r}"
        else:
            what = f"unexpected {str(token)!r}"
    names: set[str] = set(
        getattr(error, "accepts", None)
        or getattr(error, "expected", None)
        or getattr(error, "allowed", None)
        or ()
    )
    wanted = sorted({_EXPECTED.get(name, name) for name in names if not at_end or name != "$END"})
    expected = f"; expected {' or '.join(wanted)}" if wanted else ""
    hint = ""
    previous = re.search(r"([A-Za-z]+)\s*$", text[:position])
    if previous and previous.group(1) in ("and", "or", "not"):
        hint = f" (write {previous.group(1).upper()} in capitals)"
    return FilterError(
        f"{what} at {_where(text, position)}{expected}{hint}: {_excerpt(text, position)!r}",
        position,
    )


def _check_size(tree: Tree[Token]) -> None:
    # Iterative, so that a hostile filter cannot exhaust the stack before being refused.
    stack: list[tuple[Tree[Token] | Token, int]] = [(tree, 1)]
    terms = 0
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, Tree):
            continue
        if node.data in ("compare", "has"):
            terms += 1
            if terms > MAX_TERMS:
                raise FilterError(f"has more than {MAX_TERMS} comparisons")
            continue
        if depth > MAX_DEPTH:
            raise FilterError(f"nests deeper than {MAX_DEPTH} levels (AND, OR, NOT, brackets)")
        stack.extend((child, depth + 1) for child in node.children)


@dataclass(frozen=True)
class _Value:
    kind: Literal["string", "bare", "star"]
    text: str  # as the user meant it: quotes and escapes resolved
    parts: tuple[str, ...]  # `text` cut at its unescaped stars (its wildcards); one part if none
    position: int


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}


def _unquote(token: str) -> tuple[str, tuple[str, ...]]:
    """A quoted literal's text, and that text cut at its unescaped stars."""
    text: list[str] = []
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for char in token[1:-1]:
        if escaped:
            char = _ESCAPES.get(char, char)  # \" \' \\ \* and the rest: the character itself
            text.append(char)
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "*":
            text.append(char)
            parts.append("".join(current))
            current = []
        else:
            text.append(char)
            current.append(char)
    parts.append("".join(current))  # STRING cannot end in a lone backslash: nothing is pending
    return "".join(text), tuple(parts)


@v_args(inline=True)
class _ToSql(Transformer[Token, Any]):
    def __init__(self, text: str, target: FilterTarget) -> None:
        super().__init__()
        self._text = text
        self._target = target

    def empty(self) -> None:
        return None

    def and_(self, *terms: ColumnElement[bool]) -> ColumnElement[bool]:
        return and_(*terms)

    def or_(self, *terms: ColumnElement[bool]) -> ColumnElement[bool]:
        return or_(*terms)

    def not_(self, term: ColumnElement[bool]) -> ColumnElement[bool]:
        negated: ColumnElement[bool] = not_(term)
        return negated

    def value(self, token: Token) -> _Value:
        position = token.start_pos or 0
        if token.type == "STAR":
            return _Value("star", "*", ("", ""), position)
        if token.type == "STRING":
            text, parts = _unquote(str(token))
            return _Value("string", text, parts, position)
        return _Value("bare", str(token), (str(token),), position)

    def has(self, field: Token, value: _Value) -> ColumnElement[bool]:
        name = self._field(field)
        if name == "tags":
            target = self._target
            conditions = [target.tags_key == target.key]
            if value.kind != "star":
                conditions.append(_equals(target.tags.c.tag, value))
            return exists(select(target.tags_key).where(*conditions).correlate(target.table))
        if value.kind != "star":
            raise FilterError(
                f"{name}:{value.text} at {self._at(field)}: ':' tests tags (tags:\"x\") or "
                f"presence ({name}:*); compare values with '='",
                field.start_pos,
            )
        if name.startswith(_LABELS):
            return self._label_match(name, None)
        column = self._target.table.c[name]
        return column.is_not(None) if name in _OPTIONAL_FIELDS else true()

    def compare(self, field: Token, operator: Token, value: _Value) -> ColumnElement[bool]:
        name, op = self._field(field), str(operator)
        if name == "tags":
            raise FilterError(
                f'tags at {self._at(field)} are tested with ":", as in tags:"x"', field.start_pos
            )
        if name.startswith(_LABELS):
            if value.kind == "star":
                raise FilterError(
                    f"{name} at {self._at(field)}: compare it with a quoted string, or test "
                    f"presence with {name}:*",
                    field.start_pos,
                )
            values = self._target.labels.c.value
            if op == "=" and len(value.parts) == 1:
                return self._label_match(name, value.text)
            if op in ("=", "!="):
                matches = _equals(values, value)
                return self._label(name, matches if op == "=" else not_(matches))
            return self._label(name, _text_order(op, values, value.text))
        column = self._target.table.c[name]
        if name in _NUMBER_FIELDS:
            operand: Any = self._number(name, value)
        elif name in _TIME_FIELDS:
            operand = self._micros(name, value)
        elif value.kind == "star":
            raise FilterError(
                f'{name} at {self._at(field)}: compare it with a quoted string ("*" matches all)',
                field.start_pos,
            )
        elif op in ("=", "!=") and len(value.parts) > 1:
            matches = _equals(column, value)
            condition: ColumnElement[bool] = matches if op == "=" else not_(matches)
            return and_(column.is_not(None), condition)
        elif op in ("=", "!="):
            operand = value.text
        else:
            condition = _text_order(op, column, value.text)
            return and_(column.is_not(None), condition) if name in _OPTIONAL_FIELDS else condition
        condition = _COMPARE[op](column, operand)
        if name in _OPTIONAL_FIELDS:
            condition = and_(column.is_not(None), condition)
        return condition

    def _label(self, name: str, condition: ColumnElement[bool] | None) -> ColumnElement[bool]:
        """The row has label `name` (labels.KEY), with a value meeting `condition`.

        Like every comparison, one on a label never matches a row without that label.
        """
        target = self._target
        conditions = [target.labels_key == target.key, target.labels.c.key == name[len(_LABELS) :]]
        if condition is not None:
            conditions.append(condition)
        return exists(select(target.labels_key).where(*conditions).correlate(target.table))

    def _label_match(self, name: str, value: str | None) -> LabelMatch:
        """labels.KEY = "value" (or labels.KEY:* when value is None), in both of its forms."""
        target = self._target
        key = name[len(_LABELS) :]
        selected = [target.labels.c.key == key]
        if value is not None:
            selected.append(target.labels.c.value == value)
        labelled: ColumnElement[bool] = target.key.in_(select(target.labels_key).where(*selected))
        return LabelMatch(
            key,
            value,
            per_row=self._label(name, selected[1] if value is not None else None),
            from_labels=labelled,
        )

    def _at(self, token: Token | _Value) -> str:
        position = token.position if isinstance(token, _Value) else token.start_pos
        return _where(self._text, position or 0)

    def _field(self, token: Token) -> str:
        name = str(token)
        # AIP-160 names fields by their path in the resource: Data.metadata.latitude.
        bare = name.removeprefix("metadata.")
        if bare in FIELDS or (name == bare and (name in FILTERABLE_FIELDS or name == "tags")):
            return bare
        if name.startswith(_LABELS):
            problem = check_key(name[len(_LABELS) :])
            if problem is None:
                return name
            raise FilterError(f"{problem} (at {self._at(token)})", token.start_pos)
        raise FilterError(
            f"unknown field {name!r} at {self._at(token)}; valid fields: {_FIELD_LIST}",
            token.start_pos,
        )

    def _number(self, name: str, value: _Value) -> float | int:
        if value.kind != "bare" or not _NUMBER.fullmatch(value.text):
            shown = value.text if value.kind != "string" else f'"{value.text}"'
            raise FilterError(
                f"{name} is a number; {shown} at {self._at(value)} is not", value.position
            )
        if name != "size":
            return float(value.text)  # 1e999 is inf, which both engines compare correctly
        try:
            number = Decimal(value.text)
        except InvalidOperation:  # pragma: no cover - _NUMBER only lets decimals through
            raise FilterError(f"size: {value.text} is not a number", value.position) from None
        # Clamped before int(): int(Decimal("1e999999999")) would build a billion digits.
        if number > _MAX_BIGINT:
            return _MAX_BIGINT
        if number < _MIN_BIGINT:
            return _MIN_BIGINT
        if number % 1:
            raise FilterError(
                f"size is a whole number of bytes, not {value.text} (at {self._at(value)})",
                value.position,
            )
        return int(number)

    def _micros(self, name: str, value: _Value) -> int:
        if value.kind == "star":
            raise FilterError(
                f'{name} is a time: compare it with an RFC 3339 string like "2024-05-01T00:00:00Z"',
                value.position,
            )
        try:
            moment = parse_datetime(value.text)
        except ValueError:
            raise FilterError(
                f"{name} is a time; {value.text!r} at {self._at(value)} is not an RFC 3339 "
                'timestamp like "2024-05-01T00:00:00Z" or "2024-05-01T02:00:00+02:00"',
                value.position,
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)  # as stored: offset-less times compare as UTC
        return (moment - _EPOCH) // timedelta(microseconds=1)


_COMPARE: dict[str, Any] = {
    "=": lambda c, v: c == v,
    "!=": lambda c, v: c != v,
    "<": lambda c, v: c < v,
    "<=": lambda c, v: c <= v,
    ">": lambda c, v: c > v,
    ">=": lambda c, v: c >= v,
}


def _equals(column: ColumnElement[Any], value: _Value) -> ColumnElement[bool]:
    """column = value, its unescaped stars matching any run of characters.

    PostgreSQL's LIKE is case-sensitive; SQLite's is not, unless a connection pragma says so.
    SQLite's GLOB always is, and can use an index as LIKE does, so SQLite gets GLOB: the filter
    means the same on every engine, whatever connection it runs on.
    """
    if len(value.parts) == 1:
        equal: ColumnElement[bool] = column == value.text
        return equal
    like = column.like("%".join(_like_literal(p) for p in value.parts), escape="\\")
    glob = column.op("GLOB", is_comparison=True)("*".join(_glob_literal(p) for p in value.parts))
    return _PerDialect(sqlite=glob, other=like)


def _like_literal(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _glob_literal(text: str) -> str:
    # GLOB has no escape character: a special character is matched by a one-character class.
    return re.sub(r"([*?\[])", r"[\1]", text)


def _text_order(op: str, column: ColumnElement[Any], operand: str) -> ColumnElement[bool]:
    """column op operand in code point order, as SQLite's default BINARY collation compares.

    PostgreSQL orders text by the database's locale ("B" < "a" or not, depending on it): the
    "C" collation makes `<` mean the same on every server. Equality needs no such help.
    """
    compare = _COMPARE[op]
    return _PerDialect(sqlite=compare(column, operand), other=compare(column.collate("C"), operand))


class _PerDialect(ColumnElement[bool]):
    """One condition, written one way for SQLite and another for the other engines."""

    inherit_cache = True
    type = Boolean()
    # A condition, not a boolean value: SQLite must not get `(x GLOB y) = 1`, which hides the
    # GLOB from its index optimizer.
    _is_implicitly_boolean = True
    # What SQLAlchemy's statement cache keys on (the base declares it as an instance attribute,
    # so ClassVar is not allowed here).
    _traverse_internals: list[tuple[str, InternalTraversal]] = [  # noqa: RUF012
        ("sqlite", InternalTraversal.dp_clauseelement),
        ("other", InternalTraversal.dp_clauseelement),
    ]

    def __init__(self, *, sqlite: ColumnElement[bool], other: ColumnElement[bool]) -> None:
        self.sqlite = sqlite
        self.other = other


class LabelMatch(ColumnElement[bool]):
    """`labels.KEY = "value"` or `labels.KEY:*`, written one of two ways.

    `per_row` (EXISTS) walks the items in page order and looks each one's label up: fast when
    many items match. `from_labels` (IN) reads the matching labels from their (key, value)
    index, then sorts those items: fast when few match. PostgreSQL's planner chooses between
    them by itself from its statistics; SQLite's cannot tell a common value from a rare one,
    so the catalog counts the matches first and sets `drive_from_labels` (see catalog.items._list).
    """

    inherit_cache = True
    type = Boolean()
    _is_implicitly_boolean = True
    _traverse_internals: list[tuple[str, InternalTraversal]] = [  # noqa: RUF012
        ("per_row", InternalTraversal.dp_clauseelement),
        ("from_labels", InternalTraversal.dp_clauseelement),
        ("drive_from_labels", InternalTraversal.dp_boolean),
    ]

    def __init__(
        self,
        key: str,
        value: str | None,
        *,
        per_row: ColumnElement[bool],
        from_labels: ColumnElement[bool],
    ) -> None:
        self.key = key
        self.value = value
        self.per_row = per_row
        self.from_labels = from_labels
        self.drive_from_labels = False


@compiles(LabelMatch)
def _compile_label_match(element: LabelMatch, compiler: SQLCompiler, **kw: Any) -> str:
    chosen = element.from_labels if element.drive_from_labels else element.per_row
    return f"({compiler.process(chosen, **kw)})"


# Parenthesized, so that a NOT in front applies to the whole condition on every engine.
@compiles(_PerDialect)
def _compile_other(element: _PerDialect, compiler: SQLCompiler, **kw: Any) -> str:
    return f"({compiler.process(element.other, **kw)})"


@compiles(_PerDialect, "sqlite")
def _compile_sqlite(element: _PerDialect, compiler: SQLCompiler, **kw: Any) -> str:
    return f"({compiler.process(element.sqlite, **kw)})"
