"""MkDocs hook: the API page must document every public name.

Run by `mkdocs build`; with `strict: true` the warning fails the build, so a
name added to `keras_teleport.__all__` cannot go undocumented.
"""

import ast
import logging
import pathlib
import re

log = logging.getLogger("mkdocs.hooks.api_coverage")
INIT = pathlib.Path(__file__).parents[1] / "keras_teleport" / "__init__.py"


def _public_names():
    # Parsed, not imported: importing the package would load TensorFlow.
    for node in ast.parse(INIT.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", None) == "__all__" for t in node.targets
        ):
            return set(ast.literal_eval(node.value))
    return set()


def on_page_markdown(markdown, page, **kwargs):
    if page.file.src_uri != "api.md":
        return markdown
    documented = set(re.findall(r"^::: keras_teleport\.(\w+)\s*$", markdown, re.M))
    missing = sorted(_public_names() - documented)
    if missing:
        log.warning(
            "docs/api.md does not document keras_teleport.%s",
            ", keras_teleport.".join(missing),
        )
    return markdown
