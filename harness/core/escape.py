"""Text that came from a study file (names, labels, protocol values, errors) made safe for where it goes.

A study file is shared like code, so nothing in it may format a terminal, break a table or run in a page:

- `printable(text)`: for a terminal or a log. C0/C1 control characters (ESC sequences that recolour, move the
  cursor or retitle the window; a bare CR that overprints a line) and the Unicode bidirectional overrides
  ("Trojan source") are dropped; newlines and tabs stay.
- `latex(text)`: for LaTeX captions and labels, escaped as pandas escapes cells (`\\write18{...}` stays text,
  the `_` of `pmg_ablation` no longer stops the build).
- `markdown_cell(text)` / `markdown_frame(df)`: for Markdown tables (`|` is escaped, a newline becomes a space).
- `redact_uri(uri)`: a storage URI without its credentials (user:password@ and secret query parameters);
  `redact_argv(argv)`: a command line with every URI in it redacted (what .lock and .lease record);
  `scrub(text)`: any text without credentials: URIs' user:password@ and secret parameters, the values of
  secret environment variables (names with KEY, SECRET, TOKEN, PASSWORD, CREDENTIAL) and of the `${VAR}`s a
  study expanded (shown as `${VAR}`, never as their value). `printable` scrubs too: nothing printed carries one.
- `csv_frame(df)`: spreadsheet-safe CSV cells (a text starting with = + - @, a tab or a CR is prefixed with ',
  as spreadsheets expect: `=HYPERLINK(...)` stays text); `latex_frame(df)`: cells without newlines or control
  characters (a blank line inside a tabular ends the table); `markdown_cell` also escapes `<` and `>` (raw HTML
  in Markdown is rendered by most viewers).
- HTML is never escaped by hand: every page is rendered through an autoescaping jinja2 template.
"""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pandas as pd

# C0 controls but \t and \n, DEL, the C1 controls (\x9b is a one-byte CSI), and the bidi embeddings/overrides
# and isolates of Unicode (U+202A-U+202E, U+2066-U+2069).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: object) -> str:
    """`text` as a string with nothing a terminal would interpret and no credentials (see the module docstring)."""
    return scrub(_CONTROL.sub("", str(text)))


def one_line(text: object) -> str:
    """printable, on one line (a progress line, a table cell): newlines and tabs become spaces."""
    return re.sub(r"[\t\n]+", " ", printable(text).replace("\r", " "))


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_LATEX_RE = re.compile("|".join(re.escape(k) for k in _LATEX))


def latex(text: object) -> str:
    """`text` typeset literally by LaTeX (every special character escaped; control characters dropped)."""
    return _LATEX_RE.sub(lambda m: _LATEX[m.group()], printable(text).replace("\n", " "))


def latex_label(text: object) -> str:
    """A \\label key: letters, digits and `:._-` only (a label is never typeset, but braces and backslashes
    would end it)."""
    return re.sub(r"[^A-Za-z0-9:._-]", "-", str(text))


def markdown_cell(value: object) -> object:
    """A Markdown table cell: `|` escaped (it would start a new column), `<` and `>` escaped (raw HTML), newlines
    and controls flattened."""
    if not isinstance(value, str):
        return value
    return markdown_text(value).replace("|", r"\|")


def markdown_text(text: object) -> str:
    """Text in a Markdown line (a heading, a note): one line, no raw HTML (`<` and `>` backslash-escaped)."""
    return one_line(text).replace("<", r"\<").replace(">", r"\>")


def markdown_frame(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of `df` whose cells, index and column labels are Markdown-safe (for `DataFrame.to_markdown`)."""
    out = df.copy()
    out.attrs = {}
    out = out.map(markdown_cell) if hasattr(out, "map") else out.applymap(markdown_cell)
    out.columns = [markdown_cell(str(c)) for c in out.columns]
    out.index = pd.Index([markdown_cell(str(i)) for i in out.index],
                         name=markdown_cell(str(out.index.name)) if out.index.name is not None else None)
    return out


# Query parameters that carry secrets in the URIs pyarrow and fsspec take (S3, GCS, Azure, HTTP signatures).
_SECRET_PARAMS = re.compile(r"(key|secret|token|password|passwd|credential|signature|sig|auth)", re.IGNORECASE)


def redact_uri(uri: object) -> str:
    """A URI as it may be stored or shown: no `user:password@`, no secret query parameters (the names of the
    parameters stay, their values become ***). A plain path is returned as it is."""
    text = str(uri)
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return text.split("://", 1)[0] + "://***"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    if "@" in parts.netloc:
        netloc = "***@" + netloc
    query = urlencode([(k, "***" if _SECRET_PARAMS.search(k) else v)
                       for k, v in parse_qsl(parts.query, keep_blank_values=True)], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def redact_argv(argv: list[str]) -> str:
    """A command line as it may be stored or shown: each argument (or the value of --name=value) that is a URI
    without its credentials (harness.results.store.RunLock and the storage lease record who holds them)."""
    out = []
    for arg in argv:
        head, eq, tail = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        out.append(f"{head}{eq}{redact_uri(tail)}" if "://" in tail else arg)
    return scrub(" ".join(out))


# ----------------------------------------------------------------------------- credentials in any text

_URI_USER = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]{0,20}://)[^\s/@'\"]+@")
_URI_SECRET = re.compile(r"([?&;][^=&\s'\"]*(?:key|secret|token|password|passwd|credential|signature|sig|auth)"
                         r"[^=&\s'\"]*=)[^&\s'\"]+", re.IGNORECASE)
_SECRET_ENV = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)
_EXPANDED: dict[str, str] = {}  # value -> "${VAR}" of every environment variable a study expanded (a path)


def remember_expansion(name: str, value: str) -> None:
    """A study expanded `${name}` into `value` (harness.study.overrides): shown as `${name}` from now on."""
    if len(value) >= 6:
        _EXPANDED[value] = "${" + name + "}"


def _secrets() -> list[tuple[str, str]]:
    found = [(v, "***") for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= 8]
    return sorted(found + list(_EXPANDED.items()), key=lambda kv: -len(kv[0]))


def scrub(text: str) -> str:
    """`text` without credentials: see the module docstring."""
    if "://" in text:
        text = _URI_SECRET.sub(r"\1***", _URI_USER.sub(r"\1***@", text))
    for value, shown in _secrets():
        if value in text:
            text = text.replace(value, shown)
    return text


def scrub_data(value):
    """`scrub` over every string of nested data (a study written to study.yaml)."""
    if isinstance(value, dict):
        return {k: scrub_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_data(v) for v in value]
    return scrub(value) if isinstance(value, str) else value


# ----------------------------------------------------------------------------- CSV and LaTeX cells

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def csv_cell(value: object) -> object:
    """A CSV cell a spreadsheet shows as text: a string starting with = + - @, a tab or a CR is prefixed with '
    (OWASP's advice for CSV injection); numbers, and the table's own "-" for a cell that did not run, stay."""
    if isinstance(value, str) and value.startswith(_FORMULA_START) and value != "-" and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def _frame(df: pd.DataFrame, cell) -> pd.DataFrame:
    out = df.copy()
    attrs, out.attrs = dict(df.attrs), {}
    out = out.map(cell) if hasattr(out, "map") else out.applymap(cell)
    out.columns = pd.Index([cell(c) for c in df.columns], name=cell(df.columns.name))
    out.index = pd.Index([cell(i) for i in df.index], name=cell(df.index.name))
    out.attrs = attrs
    return out


def csv_frame(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of `df` whose cells, index and column labels are spreadsheet-safe (for `DataFrame.to_csv`)."""
    return _frame(df, csv_cell)


def latex_frame(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of `df` whose text is on one line with no control characters (for `to_latex(escape=True)`, which
    escapes LaTeX's special characters but keeps a blank line, which ends the tabular)."""
    return _frame(df, lambda v: one_line(v) if isinstance(v, str) else v)
