"""What each CLI command does, as plain functions of typed options (no click here).

prepare    every check before a run touches anything; the run's config
run        ``batchgen run``: lock, resume, answer, write, report
dryrun     ``run --dry-run``: rows, tokens, cost and time, nothing sent
validate   ``batchgen validate``
outputs    the tables beside an output (.partial-, .replaced-) and the swap into place
summary    ``--summary PATH``
cost       ``batchgen cost``
"""
