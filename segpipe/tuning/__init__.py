"""Hyper-parameter search (``segpipe tune``): the top of the stack. Reads a work folder and a search space
(``plans/search/*.json``); trains and validates trials with :mod:`segpipe.training`; writes
``WORK/tune/`` (the Optuna study database, trial run folders, ``best.json``, ``report.html``). Nothing
else in segpipe imports it."""
