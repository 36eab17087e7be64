"""User-facing errors and the one place where command-line tools turn them into exit codes.

Every command-line entry point wraps its body with :func:`run_cli`. A :class:`UserError`
(bad input, a missing file, a misspelled option) becomes one line on stderr and exit code 2 (or its ``exit_code``),
with no traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn


class UserError(Exception):
  """A mistake the user can fix. The message names the problem and the fix."""

  exit_code = 2  # subclasses may say more (3: a compiled step does not fit the accelerator)


def fail(message: str) -> NoReturn:
  """Raises :class:`UserError` with ``message``."""
  raise UserError(message)


def run_cli(main: Callable[[], int | None]) -> NoReturn:
  """Runs ``main`` and exits: its return code, or 2 with one error line for a UserError."""
  try:
    code = main()
  except UserError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(err.exit_code)
  sys.exit(code or 0)
