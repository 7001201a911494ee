"""`longtune prep CONFIG [key=value ...]` and `longtune prep --merge OUT SHARD_DIR...`: thin layers over
`prepare_corpus` and `merge_shards`. Bad config or input: one `longtune: error:` line, exit code 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys

EXIT_USAGE = 2


def _fail(message: str) -> int:
    print(f"longtune: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: list[str]) -> int:
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):  # prep never downloads
        os.environ.setdefault(key, "1")
    parser = argparse.ArgumentParser(prog="longtune prep", description="Build a packed long-sequence corpus.")
    parser.add_argument("config", help="prep config YAML (or, with --merge, the output dir)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides (with --merge: shard dirs)")
    parser.add_argument("--merge", action="store_true", help="join the outputs of sharded runs into CONFIG")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .errors import PrepError

    try:
        if args.merge:
            from .shards import merge_shards

            result = merge_shards(args.config, args.overrides)
        else:
            from .config import load_prep_config
            from .pipeline import prepare_corpus

            result = prepare_corpus(load_prep_config(args.config, args.overrides))
    except PrepError as exc:
        return _fail(str(exc))
    from .report import format_table

    print(format_table(result.metadata))
    print(f"longtune: wrote {result.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
