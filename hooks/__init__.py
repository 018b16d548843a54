"""numwatch's training-side hooks: ``watcher = hooks.watch(model, optimizer, scaler=scaler)``."""
