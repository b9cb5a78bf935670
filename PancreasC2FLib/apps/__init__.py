"""The applications on top of the library: the command line (cli.py), batch runs (batch.py), the
demo (demo.py), the benchmark (benchmark.py), JSON reports (report.py) and PNG overlays
(overlay.py)."""
