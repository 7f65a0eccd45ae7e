"""Credentials never leave in a URL: ``public_text`` masks them in any text (a reward or metric spec, a
mixture, a '|'-list of servers, a message), and everything that writes or prints a spec goes through it:
the model card, ``run.json``, ``metrics.json``, the trackers' config, logs and the console."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s,|\"'<>()\[\]{}`]+")
# query parameters whose names look like credentials (api_key, key, token, access_token, sig, signature, X-Amz-
# Signature, X-Amz-Credential, auth, password, secret, session)
SECRET_QUERY = re.compile(r"key|token|secret|passw|sig|auth|credential|session", re.I)
MASK = "***"


def public_url(url: str) -> str:
    """``url`` with its userinfo (``user:password@``) and credential-named query values masked."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    userinfo = f"{MASK}@" if "@" in parts.netloc else ""
    query = urlencode([(k, MASK if SECRET_QUERY.search(k) else v) for k, v in parse_qsl(parts.query,
                                                                                        keep_blank_values=True)],
                      safe="*")
    return urlunsplit((parts.scheme, userinfo + host, parts.path, query, parts.fragment))


def public_text(text: str) -> str:
    """``text`` with every URL in it passed through ``public_url``."""
    def masked(match) -> str:
        url = match.group(0).rstrip(".:;!?")  # sentence punctuation after a URL is not part of it
        return public_url(url) + match.group(0)[len(url):]

    return URL.sub(masked, text) if "://" in text else text
