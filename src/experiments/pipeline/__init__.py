"""One experiment from config to record: the config checked, the data, model and strategy
built, the model trained, evaluated and recorded; and groups of such runs (repeats, folds)."""
