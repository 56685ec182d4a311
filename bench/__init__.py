"""Benchmarks and their committed results (bench/results/), run from the repository root as
``python -m bench.<name>`` (``make bench``, ``make bench-micro``, ``make gpu-check``).

Imports only go down: ``run`` -> ``study`` -> ``study_report`` -> ``study_plan``, and ``run`` ->
``capacity`` -> ``capacity_report`` -> ``capacity_plan`` -> ``study_plan`` (the capacity suite reuses
the study's driver, grids and scorer); ``run``, ``study`` and ``capacity`` launch each training run
through ``train_run``; everything records its machine through
``hardware``. Every bench import is at module level, so tests/unit/test_bench.py sees (and
forbids) any cycle. Rank scripts (``*_rank.py``) are started by path through
``tests.helpers.launch.launch_ranks``, whose environment puts the repository root on PYTHONPATH.
The tooling bench shares with the tests (launchers, tiny models, RSS sampling) lives once, in
``tests.helpers``. Every results file holds a ``hardware.describe()`` record: machine, package
versions and the code commit.
"""
