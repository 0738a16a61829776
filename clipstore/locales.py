"""BCP 47 language tags in one case: tags are case-insensitive (RFC 5646 §2.1.1), so `en-us` and `en-US` are
one locale. Every tag the service takes is stored and compared in the RFC's conventional case."""

from __future__ import annotations


def canonical_locale(tag: str) -> str:
    """The tag in RFC 5646 §2.1.1's case: language lower case (`en`), a four-letter script title case
    (`Hant`), a two-letter region upper case (`US`), everything else lower case, and nothing after a
    singleton (`x-…`, `u-…`) treated as script or region. Validating the tag is the caller's."""
    out: list[str] = []
    extension = False
    for i, subtag in enumerate(tag.split("-")):
        if i == 0 or extension or len(subtag) == 1:
            extension = extension or (i > 0 and len(subtag) == 1)
            out.append(subtag.lower())
        elif len(subtag) == 2 and subtag.isalpha():
            out.append(subtag.upper())
        elif len(subtag) == 4 and subtag.isalpha():
            out.append(subtag.title())
        else:
            out.append(subtag.lower())
    return "-".join(out)
