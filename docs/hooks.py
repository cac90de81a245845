"""MkDocs hook: links from docs/ to files of the repository outside it (../README.md, ../benchmarks/...).

The site is built into site/ at the repository's root with ``use_directory_urls: false``, so such a link,
left as it is, opens the repository's file when the site is read from a checkout.  MkDocs warns about every
link outside docs/ (and ``--strict`` fails); this hook drops that warning where the target exists, so a link
to a file that is gone still fails the build.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

_OUTSIDE = re.compile(r"Doc file '(?P<page>[^']+)' contains a link '(?P<link>\.\./[^'#?]+)[^']*', but the target")
_DOCS = Path(__file__).resolve().parent


class _ExistingRepositoryFile(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        match = _OUTSIDE.match(record.getMessage())
        if not match:
            return True
        target = (_DOCS / Path(match["page"]).parent / match["link"]).resolve()
        return not target.is_file()


_FILTER = _ExistingRepositoryFile()


def on_startup(command: str, dirty: bool) -> None:
    logger = logging.getLogger("mkdocs.structure.pages")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
