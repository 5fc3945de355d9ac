"""The benchmark sweep's parts, split along its seams (``bench/sweep.py`` is the command line).

- :mod:`.cases`: benchmark problems (:class:`~.cases.Case`) and presets;
- :mod:`.cost`: the analytic cost model (FLOPs, fewest bytes, floors);
- :mod:`.measure`: the environment, timers, peak memory, machine ceilings;
- :mod:`.providers`: the ways a case is computed, one registry (:data:`~.providers.PROVIDERS`);
- :mod:`.report`: CSV, markdown, acceptance lines, plots;
- :mod:`.runner`: the sweep loop tying them together.
"""
