"""A fine-tuning experiment: ``config`` (``TrainConfig`` and its sections), ``fold`` (a fold's inputs),
``finetune`` (``train_and_evaluate``), ``rundir`` / ``runguard`` / ``runhooks`` / ``runlog`` (the run
directory, its checks, hooks and log), ``results_page``, ``bids_app``."""
