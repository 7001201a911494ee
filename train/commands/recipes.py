"""`longtune recipes`: the shipped recipes and the prep, accelerate and deepspeed configs, with their paths."""

from __future__ import annotations

import argparse

from . import command_main


@command_main
def main(argv: list[str]) -> int:
    from ..recipe import RECIPES_DIR, shipped_recipes

    argparse.ArgumentParser(prog="longtune recipes", description=__doc__.split(": ", 1)[1]).parse_args(argv)
    for name in shipped_recipes():
        print(f"{name:28s} {RECIPES_DIR / (name + '.yaml')}")
    for what, pattern in (("prep configs (longtune prep NAME)", "prep/*.yaml"),
                          ("accelerate configs", "accelerate/*.yaml"), ("deepspeed configs", "deepspeed/*.json")):
        print(f"\n{what}:")
        for path in sorted(RECIPES_DIR.glob(pattern)):
            print(f"{path.stem:28s} {path}")
    return 0
