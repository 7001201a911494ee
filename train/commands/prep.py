"""`longtune prep CONFIG [key=value ...]` and `longtune prep --merge OUT SHARD_DIR...`: thin layers over
`prepare_corpus` and `merge_shards`. Bad config or input (PrepError): one `longtune: error:` line, exit code 2."""

from __future__ import annotations

import argparse
import logging

from . import command_main, offline_environment


@command_main
def main(argv: list[str]) -> int:
    offline_environment()  # prep never downloads
    parser = argparse.ArgumentParser(prog="longtune prep", description="Build a packed long-sequence corpus.")
    parser.add_argument("config", help="prep config YAML (or, with --merge, the output dir)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides (with --merge: shard dirs)")
    parser.add_argument("--merge", action="store_true", help="join the outputs of sharded runs into CONFIG")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.merge:
        from longtune.data_prep.shards import merge_shards

        result = merge_shards(args.config, args.overrides)
    else:
        from longtune.data_prep.config import load_prep_config
        from longtune.data_prep.pipeline import prepare_corpus

        result = prepare_corpus(load_prep_config(args.config, args.overrides))
    from longtune.data_prep.report import format_table

    print(format_table(result.metadata))
    print(f"longtune: wrote {result.output}")
    return 0
