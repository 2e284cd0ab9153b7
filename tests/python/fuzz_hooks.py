"""Schemathesis hooks for tests/fuzz.rs: the inputs generated requests never hold by themselves.

Schemathesis sends syntactically valid JSON (of right or wrong shapes) with every header the run
configures. One request in every STRIDE is broken here instead, in turn: its body becomes
malformed JSON (cut short, trailing garbage, invalid UTF-8, a lone surrogate, nesting deeper than
any parser allows, numbers past i64 and f64, a body over the server's limit), or one of its
headers goes missing (Authorization, the session Cookie, Content-Type). The server must refuse
each with a 4xx and change nothing; tests/fuzz.rs checks that no answer is a 5xx.
"""

import itertools

import schemathesis

STRIDE = 5

MALFORMED = [
    b'{"text": "cut short',
    b'{"text": "x"} trailing',
    b'{"text": "\xff\xfe\xfd"}',
    b'{"text": "\\ud800 lone surrogate"}',
    b"[" * 5000 + b"]" * 5000,
    b'{"text": "hi", "max_tokens": 1e400}',
    b'{"text": "hi", "max_tokens": 123456789012345678901234567890}',
    b'{"text": "hi", "max_tokens": -9223372036854775809, "seed": 18446744073709551616}',
    b"\x00\x01\x02\x03",
    b'{"text": "hi",}',
    b'{"text": "' + b"a" * 1_100_000 + b'"}',
    b"{" + b'"k":1,' * 40_000 + b'"text":"many keys"}',
    b"",
]
DROPPED = ["Authorization", "Cookie", "Content-Type"]

_sent = itertools.count()


def _without(header):
    """A `requests` auth hook: it runs on the prepared request, after every header is set."""

    def strip(request):
        request.headers.pop(header, None)
        return request

    return strip


@schemathesis.hook
def before_call(context, case, kwargs):
    n = next(_sent)
    if n % STRIDE:
        return
    turn = (n // STRIDE) % (len(MALFORMED) + len(DROPPED))
    takes_body = case.method.upper() in ("POST", "PUT", "PATCH")
    if turn < len(MALFORMED) and takes_body:
        # Replaces the generated body; the Content-Type stays the operation's.
        kwargs["data"] = MALFORMED[turn]
    else:
        kwargs["auth"] = _without(DROPPED[turn % len(DROPPED)])
