"""Numerical validation studies for otflow (run as scripts, e.g. ``python -m validation.solver_convergence``).

Each module exposes functions returning its numbers, so the default test suite can
check a fast subset (``tests/test_validation_*.py``), and a ``main(argv)`` that prints
the tables and writes the figures under ``validation/out/`` (not version-controlled).
"""
