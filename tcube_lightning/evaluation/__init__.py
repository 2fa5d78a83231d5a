"""The LightningModule: a run's life cycle (set-up, steps, each split's finish, predict) around the engine."""
