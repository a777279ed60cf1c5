"""Reports people read: the HTML report and its Markdown twin (``build``, ``document``, ``plots``),
its sections (budget, evaluation, claims, recommendations), the comparison page and browser
screenshots. Reading and merging runs is ``quantgate.results``; judging them, ``quantgate.history``."""
