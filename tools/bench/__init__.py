"""p2psl's benchmark suite: `tools/bench/run.py [--quick] --out DIR` runs every module.

Each module has `run(quick: bool, out: Path) -> dict` returning flat result keys (the figures
the README's Performance section shows) plus a "details" entry; none of them is run by CI.
"""
