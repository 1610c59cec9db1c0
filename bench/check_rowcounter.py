"""Check that parts.RowCounter counts as the straightforward algorithm it replaced.

    .venv/bin/python bench/check_rowcounter.py [--cases 20000]

The reference splits each chunk on quotes and counts newlines in the pieces outside
them. Random bodies (quotes, doubled quotes, CR, LF, commas, text) are cut into random
chunks; after every chunk both counters must agree on rows and on being inside quotes.
"""

from __future__ import annotations

import argparse
import random

from orchestrator.parts import RowCounter

ALPHABET = [b'"', b'""', b"\n", b"\r\n", b",", b"a", b"bc", b"Gold", b" "]


class Reference:
    """The algorithm RowCounter used before it kept only quotes and newlines."""

    def __init__(self) -> None:
        self.rows = 0
        self.in_quotes = False

    def feed(self, data: bytes) -> None:
        pieces = data.split(b'"')
        outside = pieces[1::2] if self.in_quotes else pieces[0::2]
        self.rows += sum(piece.count(b"\n") for piece in outside)
        if len(pieces) % 2 == 0:
            self.in_quotes = not self.in_quotes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    for case in range(args.cases):
        body = b"".join(rng.choice(ALPHABET) for _ in range(rng.randrange(0, 200)))
        ours, reference = RowCounter(), Reference()
        position = 0
        while position < len(body):
            step = rng.randrange(1, 40)
            chunk = body[position : position + step]
            position += step
            ours.feed(chunk)
            reference.feed(chunk)
            state = (ours.rows, ours.in_quotes)
            if state != (reference.rows, reference.in_quotes):
                print(f"case {case}: {body!r} differs after {position} bytes")
                return 1

    print(f"{args.cases} random bodies: RowCounter agrees with the reference")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
