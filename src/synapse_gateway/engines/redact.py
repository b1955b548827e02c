"""Secrets out of an engine's command line and output, before either is logged or shown.

An engine is often started with `--api-key sk-...`, `--hf-token hf_...` or `HF_TOKEN=...`; /admin/engines,
the log and error details show the command and the output with those values replaced by `***`.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping

MASK = "***"
# A name is secret if one of its words is, or ends like one: api-key, hf_token, apikey, db-password.
_SECRET_WORD = re.compile(r"(key|token|secret|password|passwd|credentials?|auth)$", re.IGNORECASE)
_WORDS = re.compile(r"[-_.]+")
_ASSIGN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.DOTALL)
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
_MIN_SECRET = 4  # shorter values are not searched for in text: they would mask half the output


def secret_name(name: str) -> bool:
    """True for flag or variable names that carry a secret (`--api-key`, `HF_TOKEN`), not for `--max-tokens`."""
    return any(_SECRET_WORD.search(word) for word in _WORDS.split(name.lstrip("-")) if word)


class Redactor:
    """Masks the secret values of one engine's argv and environment wherever they appear."""

    def __init__(self, command: Iterable[str], env: Mapping[str, str] | None = None) -> None:
        argv = list(command)
        found = _argv_secrets(argv) + [v for k, v in (env or {}).items() if secret_name(k)]
        # longest first, so a secret that contains another one is masked whole
        self._secrets = sorted({s for s in found if len(s) >= _MIN_SECRET}, key=len, reverse=True)
        self.command = [self.text(arg) for arg in _redact_argv(argv)]

    def text(self, text: str) -> str:
        """`text` with every known secret value and every URL's `user:password@` masked."""
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return _mask_userinfo(text)


def _redact_argv(argv: list[str]) -> list[str]:
    shown: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next and not arg.startswith("--"):
            shown.append(MASK)
            hide_next = False
            continue
        flag, equals, _ = arg.partition("=")
        assign = _ASSIGN.match(arg)
        hide_next = arg.startswith("-") and not equals and secret_name(flag)
        if arg.startswith("-") and equals and secret_name(flag):
            shown.append(f"{flag}={MASK}")
        elif assign is not None and secret_name(assign.group(1)):
            shown.append(f"{assign.group(1)}={MASK}")
        elif " " in arg:  # a whole shell command line in one argument (sh -c "...")
            shown.append(" ".join(_redact_argv(_split(arg))))
        else:
            shown.append(arg)
    return shown


def _argv_secrets(argv: list[str]) -> list[str]:
    """The secret values themselves, to find them again in the engine's output."""
    values: list[str] = []
    for index, arg in enumerate(argv):
        flag, equals, value = arg.partition("=")
        assign = _ASSIGN.match(arg)
        if arg.startswith("-") and secret_name(flag):
            if equals:
                values.append(value)
            elif index + 1 < len(argv) and not argv[index + 1].startswith("--"):
                values.append(argv[index + 1])
        elif assign is not None and secret_name(assign.group(1)):
            values.append(assign.group(2))
        elif " " in arg:
            values.extend(_argv_secrets(_split(arg)))
        values.extend(userinfo.rstrip("@") for userinfo in _USERINFO.findall(arg))
    return values


def _split(line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError:  # unbalanced quotes: words are good enough to find flags
        return line.split()


def _mask_userinfo(text: str) -> str:
    return _USERINFO.sub(MASK + "@", text)
