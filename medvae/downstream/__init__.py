"""The downstream study of label budgets (`medvae utility`): does synthetic data help a downstream
model trained on little real data? Subsets (``subsets``), classical augmentation (``augment``), the
cell's generator and filtered synthetic set (``synthetic_sets``), the downstream networks and their
scores (``networks``), intervals over seeds and paired differences between arms (``intervals``), and
the resumable orchestration (``study.run_utility``)."""
