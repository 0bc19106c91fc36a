"""A griffe extension for the site's API reference: our docstrings are written for reading in the source
and for ``help()``, with Sphinx roles (``:func:`x```) and doctest examples (``>>>``). Markdown shows
neither well, so before rendering, a role becomes the code span of its target's last name and a run of
doctest lines becomes a ``pycon`` code block. The docstrings themselves are not changed."""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):`~?([^`]+)`")


def _doctests_fenced(text: str) -> str:
    out, fenced = [], False
    for line in text.splitlines():
        example = line.lstrip().startswith((">>>", "..."))
        if example and not fenced:
            out.append("```pycon")
            fenced = True
        elif fenced and not line.strip():
            out.append("```")
            fenced = False
        out.append(line)
    if fenced:
        out.append("```")
    return "\n".join(out)


def rewrite(text: str) -> str:
    text = ROLE.sub(lambda m: f"`{m[1].split('.')[-1]}`", text)
    return _doctests_fenced(text)


class RestRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
