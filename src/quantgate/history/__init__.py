"""Judging runs against each other and against today's gates: ``compare`` (two runs or a history,
by a rank test of their rounds), ``regate`` (a finished run against the current gates) and
``spread`` (one process vs the same selection spread over workers or shards).

Reads runs through ``quantgate.results``; may use ``quantgate.gates``; never imports
``quantgate.report`` (rendering a comparison is ``quantgate.report.comparison``)."""
