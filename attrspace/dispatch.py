"""Former home of the backend dispatch, now attrspace.backends; this name stays for importers until
they move (new code imports attrspace.backends)."""

from .backends import (  # noqa: F401
    implementation,
    names,
    preload,
    reasons,
    select,
    status,
    unavailable_reason,
)
from .backends import status as backends  # noqa: F401
