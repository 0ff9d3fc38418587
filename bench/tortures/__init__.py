"""Parts of the torture harness (`python bench/torture.py PART`), one module each.

Every part module defines NAME (the CLI subcommand and its key in bench/results/torture.json),
`add_arguments(parser)` and `run(args) -> dict`: a JSON-able result holding at least
"passed" (bool) and "seconds". A part may define `plot(result, ax)` to draw its panel.
The short versions in tests/torture/ call the same functions with small arguments.
"""
