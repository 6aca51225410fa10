"""The downstream utility study (`medvae utility`): does synthetic data help a model trained on little
real data? Subsets (``subsets``), the cell's generator and synthetic store (``synthesis``), the
downstream network and metrics (``downstream``), statistics over seeds (``stats``) and the resumable
orchestration (``study.run_utility``)."""
