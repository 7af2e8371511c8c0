"""The authproxy benchmark harness (bench/README.md).

    settings → processes → targets → measure → summary → report → main

`settings` parses the command line; `processes` starts and watches what runs
(/proc for CPU and memory); `targets` configures nginx and authproxy and checks
each answers right; `measure` drives wrk and curl; `summary` turns raw runs into
medians, ratios and judged targets; `report` writes markdown and JSON; `main`
runs them in that order and stops every process it started. Only the product's
command line is used: authproxy runs as `authproxy run` in its own processes.
"""
