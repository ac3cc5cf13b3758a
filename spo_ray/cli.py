"""What the command-line entry points share: user errors become one line and exit code 2."""

from __future__ import annotations

import sys
from functools import wraps

from spo_ray.config import ConfigError

EXIT_OK, EXIT_TRIALS_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def user_errors_exit_2(main):
    """Run `main`; a ConfigError (bad config, data or path) prints `error: …` on stderr and exits 2."""
    @wraps(main)
    def wrapper(argv=None) -> int:
        try:
            return main(argv)
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
    return wrapper
