"""``odium kernel install [--user|--sys-prefix|--prefix P]``: the Odium Jupyter kernel's
kernelspec (the kernel itself is odium/jupyter/kernel.py)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import ConfigError
from ..jupyter.kernel import DISPLAY_NAME, KERNEL_NAME, install


def add_kernel_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``odium kernel install [--user|--sys-prefix|--prefix P]`` to the CLI's sub-parsers."""
    sp: argparse.ArgumentParser = sub.add_parser(
        "kernel", help="the Odium Jupyter kernel: odium kernel install [--user|--sys-prefix]")
    sp.add_argument("action", choices=["install"], help="install the kernelspec")
    where = sp.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="for this user only")
    where.add_argument("--sys-prefix", action="store_true",
                       help=f"into this Python's prefix ({sys.prefix}), e.g. a virtualenv")
    where.add_argument("--prefix", default=None, help="under another prefix")
    sp.add_argument("--name", default=KERNEL_NAME, help="kernelspec name (default: odium)")
    sp.add_argument("--display-name", default=DISPLAY_NAME, help="name shown in Jupyter")
    return sp


def cmd_kernel(args: argparse.Namespace) -> int:
    """``odium kernel install``: install the kernelspec; print where."""
    try:
        from jupyter_client.kernelspec import NoSuchKernel  # noqa: F401
    except ImportError:
        raise ConfigError("odium kernel needs Jupyter: pip install 'odium[notebook]'") from None
    prefix = sys.prefix if args.sys_prefix else args.prefix
    try:
        where = install(user=args.user, prefix=prefix, name=args.name,
                        display_name=args.display_name)
    except (OSError, ValueError) as e:
        hint = "" if args.user else " (use --user, or --sys-prefix in a virtualenv)"
        raise ConfigError(f"cannot install the kernelspec: {e}{hint}") from None
    print(f"installed kernelspec {args.name!r} in {where}; choose {args.display_name!r} in "
          "Jupyter")
    return 0
