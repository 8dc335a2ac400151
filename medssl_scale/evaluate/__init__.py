"""Evaluation building blocks on cached features: metrics, bootstrap intervals, label fractions, probes, kNN.

Modules (import them directly; only probe and knn need torch):
  metrics    accuracy, balanced accuracy, one-vs-rest / per-label AUC, ECE (weighted, vectorized)
  bootstrap  95% percentile intervals resampling patients
  fractions  label fractions and validation splits drawn by patient, stratified
  probe      L-BFGS logistic regression on cached features with an L2 sweep chosen on validation
  knn        cosine kNN with exp(sim / T) weighted voting
  arrays     input conversion and validation; errors: the one-line user errors
"""
