"""The one place where errors become messages: one line (plus job output where it helps), no
traceback unless RAYBRIDGE_DEBUG=1."""

from __future__ import annotations

import logging
import os
import sys

import typer

try:  # typer >= 0.20 ships its own copy of click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as click_exc

from raybridge.errors import CommandError, RaybridgeError


def fail(message: str, code: int = 1) -> None:
    first, _, rest = message.partition("\n")
    print(f"raybridge: error: {first}", file=sys.stderr)
    if rest:
        print(rest, file=sys.stderr)
    sys.exit(code)


def run_app(app: typer.Typer) -> None:
    debug = os.environ.get("RAYBRIDGE_DEBUG") == "1"
    # paramiko logs channel failures on its own; raybridge reports them as its one-line errors.
    logging.getLogger("paramiko").setLevel(logging.DEBUG if debug else logging.CRITICAL)
    try:
        rv = app(standalone_mode=False)
    except click_exc.NoArgsIsHelpError:  # help was printed
        sys.exit(0)
    except click_exc.UsageError as e:
        fail(e.format_message().replace("\n", " "), 2)
    except typer.Abort:
        fail("interrupted", 130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except CommandError as e:
        if debug:
            raise
        fail(str(e) + (f"\n{e.stderr.strip()}" if e.stderr.strip().count("\n") else ""))
    except RaybridgeError as e:
        if debug:
            raise
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except Exception as e:  # a bug: still one line, with the way to see more
        if debug:
            raise
        fail(f"internal error: {type(e).__name__}: {e} (RAYBRIDGE_DEBUG=1 shows the traceback)", 70)
    sys.exit(rv if isinstance(rv, int) else 0)
