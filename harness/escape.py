"""Text that came from a study file (names, labels, protocol values, errors) made safe for where it goes.

A study file is shared like code, so nothing in it may format a terminal, break a table or run in a page:

- `printable(text)`: for a terminal or a log. C0/C1 control characters (ESC sequences that recolour, move the
  cursor or retitle the window; a bare CR that overprints a line) and the Unicode bidirectional overrides
  ("Trojan source") are dropped; newlines and tabs stay.
- `latex(text)`: for LaTeX captions and labels, escaped as pandas escapes cells (`\\write18{...}` stays text,
  the `_` of `pmg_ablation` no longer stops the build).
- `markdown_cell(text)` / `markdown_frame(df)`: for Markdown tables (`|` is escaped, a newline becomes a space).
- `redact_uri(uri)`: a storage URI without its credentials (user:password@ and secret query parameters).
- HTML is never escaped by hand: every page is rendered through an autoescaping jinja2 template.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pandas as pd

# C0 controls but \t and \n, DEL, the C1 controls (\x9b is a one-byte CSI), and the bidi embeddings/overrides
# and isolates of Unicode (U+202A-U+202E, U+2066-U+2069).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: object) -> str:
    """`text` as a string with nothing a terminal would interpret (see the module docstring)."""
    return _CONTROL.sub("", str(text))


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
    """A Markdown table cell: `|` escaped (it would start a new column), newlines and controls flattened."""
    if not isinstance(value, str):
        return value
    return printable(value).replace("\r", " ").replace("\n", " ").replace("|", r"\|")


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
