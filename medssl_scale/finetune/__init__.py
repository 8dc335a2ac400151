"""The evaluation and fine-tuning job (launch/finetune.py): linear probe, kNN, fine-tuning with Accelerate.

Modules, in the order a run uses them:
  config       the strict EvalConfig (YAML + dotted overrides)
  labels       shard label strings -> targets: vocabulary, mapping, uncertain policy, CheXpert preset
  images       every image of a split as records; decoding and preprocessing (eval) or augmentation
  splits       train / val / test sets, labelled, the label fraction drawn by patient
  encoder      the starting encoder: encoder.pt (architecture checked), torchvision state_dict, random
  features     frozen features across processes, each image once, cached by encoder + shards + preprocessing
  heads        linear probe and kNN on cached features, chosen on validation
  train_loop   fine-tuning: epochs, early stopping, checkpoints, exact resume
  classifier   model.pt: the evaluated model as one file (for `evaluate` on other shards)
  outputs      metrics.json with intervals, predictions.csv, confusion and reliability plots, summary table
  job          one run, end to end
"""
