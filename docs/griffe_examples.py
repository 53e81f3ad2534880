"""Griffe extension for the API reference: this project's docstrings title their examples ``Example:``, which the
Google style allows; Griffe reads only ``Examples:`` as an examples section (``>>>`` lines rendered as code) and
would render ``Example:`` as a note whose ``>>>`` lines become Markdown quotes. Doctest directives
(``# doctest: +SKIP``, for the few examples the test suite cannot run) are left out of the rendered code."""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

_EXAMPLE = re.compile(r'^(\s*)Example:[ \t]*$', re.MULTILINE)
_DIRECTIVE = re.compile(r'[ \t]*# doctest: [^\n]*')


class ExampleSections(Extension):
    """Read each ``Example:`` section title as ``Examples:``; drop doctest directives."""

    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _DIRECTIVE.sub('', _EXAMPLE.sub(r'\1Examples:', obj.docstring.value))
