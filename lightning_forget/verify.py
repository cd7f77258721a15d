"""``python -m lightning_forget.verify RECORD [--original FILE] [--forgotten FILE] [--previous RECORD]``.

Checks a forgetting record against the weight files, without the data (see
:mod:`lightning_forget.plugin.record`): exit 0 and one line ``verified: ...``, or exit 1 and one line saying what
does not match.

``lightning_forget.verify`` is also, and stays, the function :func:`lightning_forget.plugin.masks.verify`. Run as a
script (``python -m``) this file is ``__main__`` and never becomes an attribute of the package; imported as the module
``lightning_forget.verify`` (``import lightning_forget.verify``, a documentation tool walking the package), it puts
that function in its own place in ``sys.modules``, which the import system then binds as the package's attribute
(CPython looks the module up in ``sys.modules`` after running it; see the footnote on loaders in the language
reference's import system chapter). So ``from lightning_forget import verify`` is the function either way.
"""

import sys

if __name__ == "__main__":
    from lightning_forget.plugin.record import main

    sys.exit(main())
else:
    from lightning_forget.plugin.masks import verify as _verify

    sys.modules[__name__] = _verify  # type: ignore[assignment]
