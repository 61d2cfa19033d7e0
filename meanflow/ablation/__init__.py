"""The ablation runner behind ``python -m meanflow.experiments`` (meanflow/experiments.py wires these together):

    grid.py        the paper's Table 1 as settings, the distinct runs they need, each named by a hash of its overrides
    process.py     the trainer child processes and the machine description
    runner.py      train and evaluate each run once, cached in its folder, with progress lines and an ETA
    evaluation.py  meanflow.evaluate (Python entry or command line) and meanflow.toy_eval, divergence as a result
    compare.py     does our order of settings match the paper's (same best, Spearman's rho)
    report.py      the markdown: tables, verdicts, sentences from the numbers, comments kept across regenerations
    figures.py     bar charts, sample grids and toy scatter plots (matplotlib imported lazily)
    toys.py        the 2-D toy section: MeanFlow 1-NFE against flow matching at 1 and 100 steps
"""
