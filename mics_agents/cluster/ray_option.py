"""``mics run --ray [ADDRESS]``: one option that is a flag alone and takes the cluster's address when one follows.

Click's options with an optional value (``is_flag=False, flag_value=...``) take the next token whenever it does not
start with ``-``, so ``mics run --ray cases.jsonl -o out.jsonl`` would read the data file as the address and then
miss its DATA. The run command's arguments are therefore read first here: the token after ``--ray`` is its address
only when it looks like one (``auto``, ``local``, ``SCHEME://...``, ``HOST:PORT``) and is not an existing file;
otherwise ``--ray`` stands alone. Either way click then sees ``--ray=VALUE`` (empty: no address), so nothing it
parses afterwards can take a token meant for something else.
"""

from __future__ import annotations

import os
import re

import typer.core

__all__ = ["RunCommand", "looks_like_address", "with_ray_values"]

_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):\d{1,5}")


def looks_like_address(token: str) -> bool:
    """What ``ray.init(address=...)`` takes: ``auto``, ``local``, ``ray://HEAD:10001`` (any ``SCHEME://``),
    ``HOST:PORT``; never an option, and never a file that exists (that is the run's DATA)."""
    if not token or token.startswith("-") or os.path.isfile(token):
        return False
    return token in ("auto", "local") or "://" in token or _HOST_PORT.fullmatch(token) is not None


def with_ray_values(args: list[str]) -> list[str]:
    """``--ray ADDRESS`` -> ``--ray=ADDRESS``; ``--ray`` before anything else -> ``--ray=`` (no address)."""
    rewritten: list[str] = []
    index = 0
    while index < len(args):
        token = args[index]
        if token == "--":  # what follows is positional, whatever it looks like
            rewritten.extend(args[index:])
            break
        if token == "--ray":
            following = args[index + 1] if index + 1 < len(args) else ""
            if looks_like_address(following):
                rewritten.append(f"--ray={following}")
                index += 2
                continue
            rewritten.append("--ray=")
        else:
            rewritten.append(token)
        index += 1
    return rewritten


class RunCommand(typer.core.TyperCommand):
    """``mics run``: its arguments with ``--ray``'s optional address made explicit before click parses them."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:  # type: ignore[no-untyped-def]
        return super().parse_args(ctx, with_ray_values(list(args)))
