"""The label-efficiency study (launch/study.py): the evaluation job swept over initializations, protocols,
label fractions and seeds, one run folder per cell, then one aggregation (the paper's "a fifth of the labels").

Modules, in the order a study uses them:
  config     the strict StudyConfig (YAML + dotted overrides, the same machinery as every other config)
  cells      the cross product as cells: folder, eval config and its hash, done-marker, cells.json
  validate   every check that needs no cell run: encoders, architectures, shards, labels, the metric
  runner     one cell's launcher command; a local pool of N processes; one cell of a Slurm array
  slurm      the array(s) of cells and the dependent aggregation job (launch/slurm/study.sbatch)
  aggregate  label_efficiency.csv, mean and std over seeds, the headline fraction per initialization
  report     summary.md, label_efficiency.png, the console tables
"""
