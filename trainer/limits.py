"""The challenge's limits (compliance-rules §7), in one place: every check, verdict and message reads them here."""

SUBMISSION_LIMIT_BYTES = 16_000_000  # artifact + counted code, decimal bytes
TRAIN_LIMIT_SECONDS = 600.0  # training wall clock on 8×H100, whatever cap a run was configured with
TRAIN_LIMIT_MS = round(TRAIN_LIMIT_SECONDS * 1000)  # the unit of training logs
EVAL_LIMIT_SECONDS = 600.0  # evaluation wall clock, whatever budget a run was given
