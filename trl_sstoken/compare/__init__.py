"""`trl-sstoken compare`: which selection method is best on the user's own data, measured rather than guessed.

Each candidate (a method, or a method with settings: `sstoken:selection_ratio=0.8`) is trained from the same base
model, seed and data order with the same training config, and evaluated on the same trusted evaluation set. Small
modules with one job each:

- `spec.py`: the candidate list (`--methods`), parsed and checked against `SSTokenConfig` before anything loads;
- `stats.py`: mean and spread over seeds, and whether a difference is inside the spread (shared with the quality
  benchmark, `benchmarks/quality`);
- `evaluation.py`: response NLL on the evaluation set, and the optional user metric (`module:function`) on greedy
  generations against the references;
- `runner.py`: the runs, one folder each, resumed from the finished ones;
- `table.py`: the terminal and markdown tables, the plot and the JSON record.
"""
