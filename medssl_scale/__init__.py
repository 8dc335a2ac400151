"""medssl-scale: SimCLR and MICLe pretraining of medical imaging models at cluster scale."""
