"""The group-relative optimizer: config, CLI, trainer, advantage estimators and losses."""
